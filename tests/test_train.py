"""stvit_core.train and ``stvit finetune`` on real data and real processes."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from stvit_core import load_model
from stvit_core.errors import InvalidArgumentError, OutputExistsError
from stvit_core.train import DistillationLoss, resolve_config, train
from tests.train_utils import (
    ROOT,
    assert_one_line_error,
    cli,
    cli_in_process,
    converted_model_dir,
    env,
    make_subset,
    tiny_deit,
    tiny_stvit,
    unwritable_dir,
)
from tests.train_utils import TINY as TINY_ARGS

MODEL_ARGS = ["--model-arg", "img_size=28", "--model-arg", "patch_size=4", "--model-arg", "embed_dim=48",
              "--model-arg", "depth=6", "--model-arg", "num_heads=2", "--model-arg", "num_image_blocks=2",
              "--num-classes", "10"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("fm") / "data", 30, 10)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from stvit_core import save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "stvit-tiny"
    save_model(tiny_stvit(tokens=4), path)
    return path


@pytest.mark.slow
def test_short_finetune_lowers_loss_and_raises_accuracy(small_data, tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = resolve_config(overrides=dict(data=str(small_data), output=str(tmp_path / "run"), epochs=5, batch_size=10,
                                        workers=0, lr=1e-3, warmup_epochs=0.5, scale_min=0.5, drop_path=0.0,
                                        smoothing=0.0))
    rows = []
    result = train(cfg, tiny_stvit(tokens=4), on_epoch_end=rows.append)
    assert len(rows) == 5
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.2
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert result["best_top1"] >= 30.0 and result["best_top1"] >= rows[0]["top1"] + 10  # chance: 10%
    out = tmp_path / "run"
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 6 and csv_lines[0].startswith("epoch,train_loss,")  # timm's summary.csv layout
    assert "eval_top1" in csv_lines[0].split(",") and csv_lines[0].endswith(",lr")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    assert (out / "config.yaml").is_file() and (out / "curves.png").stat().st_size > 1000
    best = load_model(out / "best")
    assert best.pretrained_cfg["label_names"][0] == "ankle_boot"
    assert json.loads((out / "best" / "config.json").read_text())["stvit"]["finetuned"]["top1"] == result["best_top1"]


def test_distillation_and_ema_paths_run(small_data, tmp_path):
    torch.manual_seed(0)
    teacher = tiny_deit(depth=2)
    cfg = resolve_config(overrides=dict(data=str(small_data), output=str(tmp_path / "run"), epochs=1, batch_size=20,
                                        workers=0, distill="soft", model_ema=True, model_ema_decay=0.5, mixup=0.8,
                                        cutmix=1.0))
    result = train(cfg, tiny_stvit(tokens=4), teacher=teacher)
    assert result["ema_top1"] is not None and 0 <= result["ema_top1"] <= 100
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", weights_only=True)
    assert ckpt["ema"] is not None


def test_distillation_loss_reads_the_teacher():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    targets = torch.randint(0, 3, (8,))
    soft = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, "soft", alpha=1.0, tau=2.0)
    assert soft(x, teacher(x), targets).item() == pytest.approx(0.0, abs=1e-6)  # student == teacher
    hard = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, "hard", alpha=1.0, tau=1.0)
    student = torch.randn(8, 3)
    expected = torch.nn.functional.cross_entropy(student, teacher(x).argmax(-1))
    assert hard(x, student, targets).item() == pytest.approx(expected.item())


def test_config_precedence(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("recipe: paper\nepochs: 7\nmixup: 0.1\n")
    cfg = resolve_config(None, str(yaml_file), {"mixup": 0.2, "lr": None})
    assert (cfg.recipe, cfg.epochs, cfg.mixup, cfg.cutmix, cfg.warmup_epochs, cfg.base_lr) == ("paper", 7, 0.2, 1.0, 20, 1e-3)
    yaml_file.write_text("bogus_option: 1\n")
    with pytest.raises(InvalidArgumentError, match="bogus_option"):
        resolve_config(None, str(yaml_file), {})


@pytest.mark.parametrize("line, fragment", [
    ("smoothing: 5", "smoothing: 5.0 is not in the range 0<=x<1"),
    ("lr: -1", "lr: -1.0 is not in the range x>0"),
    ("workers: -1", "workers: -1 is not in the range x>=0"),
    ("drop_path: 2", "drop_path: 2.0 is not in the range 0<=x<1"),
    ("epochs: 'abc'", "epochs: 'abc' is not a valid integer"),
    ("epochs: 2.5", "epochs: '2.5' is not a valid integer"),  # as on the command line: no silent truncation
    ("batch-size: true", "batch-size: 'True' is not a valid integer"),
    ("mixup: -1", "mixup: -1.0 is not in the range x>=0"),
    ("reprob: 3", "reprob: 3.0 is not in the range 0<=x<=1"),
    ("amp: fp8", "amp: 'fp8' is not one of 'bf16', 'fp16'"),
    ("model_ema: maybe", "model_ema: 'maybe' is not a valid boolean"),
    ("epochs: null", "epochs: needs a value"),
    ("mixup: [0.8]", "mixup: [0.8] is not a single value"),
    ("scale_min: 0", "scale_min: 0.0 is not in the range 0<x<=1"),  # keys without a flag are checked too
    ("sched: plateau", "sched: 'plateau' is not one of"),
    ("opt: bogus", "opt: 'bogus' is not one of"),
    ("model_ema_decay: 0.9", "model_ema_decay applies only with model_ema: true"),
    ("distill-tau: 2", "distill-tau applies only with distill: soft|hard"),
    ("lr: .nan", "lr: 'nan' is not a finite number"),  # NaN passes every range comparison
    ("warmup_epochs: .inf", "warmup_epochs: 'inf' is not a finite number"),
    ("lr: 0.001\nbase_lr: 0.5", "lr and base_lr exclude each other"),
])
def test_config_file_values_take_the_options_types_and_ranges(tmp_path, tiny_model_dir, line, fragment):
    config = tmp_path / "c.yaml"
    config.write_text(line + "\n")
    r = cli_in_process(["finetune", "-m", str(tiny_model_dir), "-d", "fashion-mnist", "--device", "cpu",
                        "--config", str(config), "-o", str(tmp_path / "out")])
    assert_one_line_error(r, f"{config}: {fragment}")
    assert r.returncode == 2 and not (tmp_path / "out").exists()


def test_lr_flag_with_base_lr_in_the_config_file_is_refused(tmp_path, tiny_model_dir):
    config = tmp_path / "c.yaml"
    config.write_text("base_lr: 0.5\n")
    r = cli_in_process(["finetune", "-m", str(tiny_model_dir), "-d", "fashion-mnist", "--device", "cpu",
                        "--config", str(config), "--lr", "0.001", "-o", str(tmp_path / "out")])
    assert_one_line_error(r, f"{config}: base_lr and --lr exclude each other")
    assert r.returncode == 2 and not (tmp_path / "out").exists()


def test_options_that_cannot_apply_are_refused(tmp_path, tiny_model_dir):
    """Distillation and EMA settings without --distill / --model-ema; --no-pretrained or --checkpoint for a saved
    model (it would start from random weights); --checkpoint with --no-pretrained. Nothing runs."""
    weights = tmp_path / "dtiny.pth"
    torch.save(tiny_deit().state_dict(), weights)
    common = ["-d", "fashion-mnist", "-o", str(tmp_path / "out"), "--device", "cpu"]
    model = ["-m", str(tiny_model_dir)]
    for args, fragment in [
        ([*model, "--teacher", "deit_tiny"], "--teacher applies only with --distill"),
        ([*model, "--distill-tau", "2"], "--distill-tau applies only with --distill"),
        ([*model, "--distill-alpha", "0.3"], "--distill-alpha applies only with --distill"),
        ([*model, "--model-ema-decay", "0.9"], "--model-ema-decay applies only with --model-ema"),
        ([*model, "--no-model-ema", "--model-ema-decay", "0.9"], "--model-ema-decay applies only with --model-ema"),
        ([*model, "--no-pretrained"], f"--no-pretrained cannot apply to a saved model ({tiny_model_dir}): it has its own weights"),
        ([*model, "--checkpoint", str(weights)], f"--checkpoint {weights} cannot apply to a saved model ({tiny_model_dir})"),
        (["-m", "deit_tiny", "--no-pretrained", "--checkpoint", str(weights)],
         "--checkpoint and --no-pretrained exclude each other"),
        ([*model, "--lr", "0.001", "--base-lr", "0.5"], "--lr and --base-lr exclude each other"),
        *[([*model, option, value], f"'{value}' is not a finite number") for option, value in (
            ("--lr", "nan"), ("--min-lr", "nan"), ("--clip-grad", "nan"), ("--weight-decay", "inf"),
            ("--mixup", "inf"), ("--warmup-epochs", "inf"), ("--drop-path", "nan"), ("--smoothing", "nan"),
            ("--layer-decay", "nan"))],
    ]:
        r = cli_in_process(["finetune", *args, *common])
        assert_one_line_error(r, fragment)
        assert "cannot build" not in r.stderr and r.returncode == 2
    assert not (tmp_path / "out").exists()


def test_a_saved_teacher_keeps_its_weights_with_no_pretrained(tiny_model_dir):
    """--no-pretrained is for the student's name: a teacher directory is still loaded with its weights."""
    from stvit_core.train_models import teacher_for

    student = load_model(tiny_model_dir)
    teacher = teacher_for(student, "deit_tiny", str(tiny_model_dir), pretrained=False)
    expected = load_model(tiny_model_dir).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in teacher.state_dict().items())


def test_resume_from_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, small_data, tiny_model_dir):
    bad = tmp_path / "rand.pth"
    bad.write_bytes(bytes(range(256)) * 8)
    r = cli_in_process(["finetune", "-m", str(tiny_model_dir), "-d", str(small_data), "-o", str(tmp_path / "out"),
                        "--epochs", "1", "-b", "50", "--workers", "0", "--resume", str(bad)])
    assert_one_line_error(r, f"cannot read {bad}: not a PyTorch checkpoint (or corrupt)")


def test_fp16_on_cpu_with_a_config_file_autocasts_and_scales(tmp_path, small_data, tiny_model_dir):
    """A config file's values become the options' values (YAML's string 1e-3 is the float an --lr 1e-3 gives),
    and --amp fp16 on CPU trains with torch's CPU autocast and grad scaler (it used to be float32, unscaled)."""
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-3\namp: fp16\nmodel_ema: yes\nmodel-ema-decay: 0.5\nclip_grad: null\nworkers: 0\n")
    out = tmp_path / "out"
    r = cli_in_process(["finetune", "-m", str(tiny_model_dir), "-d", str(small_data), "-o", str(out), "--epochs", "1",
                        "-b", "50", "--device", "cpu", "--config", str(config), "--quiet"])
    assert r.returncode == 0, r.stderr
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["lr"], recorded["amp"], recorded["model_ema"], recorded["model_ema_decay"]) == (1e-3, "fp16",
                                                                                                       True, 0.5)
    assert recorded["clip_grad"] is None
    ckpt = torch.load(out / "checkpoints" / "last.pth", weights_only=True)
    assert ckpt["scaler"] is not None and ckpt["ema"] is not None


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_is_exact(tmp_path):
    data = make_subset(tmp_path / "data", 20, 5)
    common = ["finetune", "-m", "stvit_deit_tiny_patch16_224", "--no-pretrained", "--tokens", "4", *MODEL_ARGS,
              "-d", str(data), "--epochs", "2", "-b", "10", "--workers", "0", "--deterministic", "--seed", "1",
              "--aa", "rand-m9-mstd0.5", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
              "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9", "--quiet"]
    full = cli([*common, "-o", str(tmp_path / "full")], fresh_process=True)
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "stvit_cli", *common, "-o", str(out), "--checkpoint-every-steps", "3"],
                            env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.pth"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["epoch"], ckpt["batches_done"]) != (2, 0), "the run finished before it could be killed"
    resumed = cli([*common, "-o", str(out), "--resume", str(last)], fresh_process=True)
    assert resumed.returncode == 0, resumed.stderr
    within = f" (batch {ckpt['batches_done']} of it done)" if ckpt["batches_done"] else ""
    assert f"resuming from {last} at epoch {ckpt['epoch'] + 1}{within}, step {ckpt['num_updates']}\n" in resumed.stderr

    a, b = _weights(tmp_path / "full" / "checkpoints" / "last.pth"), _weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = torch.load(tmp_path / "full" / "checkpoints" / "last.pth", weights_only=True)["ema"]
    eb = torch.load(last, weights_only=True)["ema"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    rows_a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["top1"] for r in rows_a] == [r["top1"] for r in rows_b]
    assert rows_a[-1]["train_loss"] == pytest.approx(rows_b[-1]["train_loss"], rel=1e-9)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = make_subset(tmp_path / "data", 30, 2)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "stvit_cli", "finetune", "-m", "stvit_deit_tiny_patch16_224",
                             "--no-pretrained", "--tokens", "4", *MODEL_ARGS, "-d", str(data), "-o", str(out),
                             "--epochs", "50", "-b", "10", "--workers", "0", "--quiet"],
                            env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr.strip().splitlines()[-1]
    ckpt = torch.load(out / "checkpoints" / "last.pth", weights_only=True)
    assert ckpt["num_updates"] >= 1


@pytest.mark.slow
def test_torchrun_two_cpu_processes_and_eval_agrees(tmp_path):
    data = make_subset(tmp_path / "data", 20, 7)  # 70 val images: uneven shards across 2 ranks
    out = tmp_path / "ddp"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "stvit_cli", "finetune", "-m", "stvit_deit_tiny_patch16_224", "--no-pretrained",
                          "--tokens", "4", *MODEL_ARGS, "-d", str(data), "-o", str(out), "--epochs", "1", "-b", "10",
                          "--workers", "0", "--json"],
                         capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert run.returncode == 0, run.stderr[:3000]
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["step"] == 10  # 200 images / (2 ranks x 10)
    config = (out / "config.yaml").read_text()
    assert "world_size: 2" in config
    single = cli(["eval", "folder", "-m", str(out / "best"), "-d", str(data / "val"), "--json", "--workers", "0"])
    assert single.returncode == 0, single.stderr
    result = json.loads(single.stdout)
    assert result["images"] == 70
    assert round(result["top1"] * 70 / 100) == round(summary["top1"] * 70 / 100)  # same correct count
    assert result["top5"] == pytest.approx(summary["top5"], abs=1e-3)
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_finetune_cli_bad_inputs(tmp_path, small_data, tiny_model_dir):
    base = ["finetune", "-m", str(tiny_model_dir), "--epochs", "1", "-b", "10", "--workers", "0", "--quiet"]
    r = cli([*base, "-d", str(tmp_path / "missing"), "-o", str(tmp_path / "o1")], fresh_process=True)  # one real process
    assert_one_line_error(r, "not found")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    r = cli_in_process([*base, "-d", str(tmp_path / "empty"), "-o", str(tmp_path / "o2")])
    assert_one_line_error(r, "empty")
    three = make_subset(tmp_path / "three", 4, 2, classes=["bag", "coat", "dress"])
    r = cli_in_process([*base, "-d", str(three), "-o", str(tmp_path / "o3")])
    assert_one_line_error(r, "--num-classes 3")
    (three / "train" / "coat" / "zz_broken.png").write_bytes(b"garbage")
    r = cli_in_process([*base, "-d", str(three), "-o", str(tmp_path / "o4"), "--num-classes", "3"])
    assert_one_line_error(r, "zz_broken.png")
    assert not (tmp_path / "o4").exists()  # failed before its first checkpoint: nothing left behind
    # a training checkpoint of a different model (other width) cannot be resumed here
    cfg = resolve_config(overrides=dict(data=str(small_data), output=str(tmp_path / "other"), epochs=1,
                                        batch_size=50, workers=0))
    train(cfg, tiny_stvit(tokens=4, embed_dim=32))
    r = cli_in_process([*base, "-d", str(small_data), "-o", str(tmp_path / "o5"),
             "--resume", str(tmp_path / "other" / "checkpoints" / "last.pth")])
    assert_one_line_error(r, "resume checkpoint")
    r = cli_in_process([*base, "-d", str(small_data), "-o", str(tmp_path / "other")])
    assert_one_line_error(r, "already exists")


def test_finetune_converts_a_timm_name_and_distils_from_its_source(small_data, tmp_path):
    out = tmp_path / "run"
    r = cli_in_process(["finetune", "-m", "deit_tiny_patch16_224", "--no-pretrained", "--tokens", "4",
                        "--model-arg", "img_size=28", "--model-arg", "patch_size=4", "--model-arg", "embed_dim=48",
                        "--model-arg", "num_classes=10", "-d", str(small_data), "-o", str(out), "--epochs", "1",
                        "-b", "50", "--workers", "0", "--distill", "hard", "--json"])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["epoch"] == 1 and result["classes"] == 10
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["architecture"].startswith("stvit_")  # converted (width 48: the generic stvit_vit)
    assert config["model_args"]["num_semantic_tokens"] == 4 and config["num_classes"] == 10
    assert "distill: hard" in (out / "config.yaml").read_text()
    # recorded as `stvit convert` records it, plus the fine-tuning and its evaluation
    record = config["stvit"]
    assert record["source_model"] == "deit_tiny_patch16_224" and record["source_weights"] == "random"
    assert record["base_gflops"] > record["gflops"] > 0 and record["num_semantic_tokens"] == 4
    results = json.loads((out / "best" / "results.json").read_text())
    assert results == {"dataset": str(small_data), "top1": result["top1"], "top5": result["top5"], "num_images": 100,
                       "split": "val"}
    assert record["finetuned"]["top1"] == result["top1"]
    bad = cli_in_process(["finetune", "-m", "deit_tiny_patch16_224", "--no-pretrained", "--model-arg", "embed_dim=32",
                          "-d", str(small_data), "-o", str(tmp_path / "bad")])
    assert_one_line_error(bad, "embed_dim")


def test_teacher_defaults_to_the_source_of_a_converted_name(tmp_path, tiny_model_dir):
    from stvit_core.train import teacher_for

    torch.manual_seed(0)
    source = tiny_deit()
    torch.save(source.state_dict(), tmp_path / "deit.pth")
    shape = {k: v for k, v in TINY_ARGS.items() if k != "num_classes"}  # the head size comes from the file
    student = load_model("deit_tiny_patch16_224", num_semantic_tokens=4, checkpoint=str(tmp_path / "deit.pth"),
                         convert=True, **shape)
    assert student.num_classes == 10
    teacher = teacher_for(student, "deit_tiny_patch16_224", checkpoint=str(tmp_path / "deit.pth"),
                          model_kwargs={**shape, "num_semantic_tokens": 4})
    assert type(teacher).__name__ == "VisionTransformer"
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in teacher.state_dict().items())

    # --num-classes resets the student's head; the source's head does not know those classes
    reset = load_model("deit_tiny_patch16_224", num_semantic_tokens=4, pretrained=False, convert=True, **shape,
                       num_classes=10)
    with pytest.raises(InvalidArgumentError, match="predicts 1000 classes, the student 10"):
        teacher_for(reset, "deit_tiny_patch16_224", pretrained=False, model_kwargs=shape)

    student = load_model(tiny_model_dir)
    with pytest.raises(InvalidArgumentError, match="needs --teacher"):
        teacher_for(student, str(tiny_model_dir))
    with pytest.raises(InvalidArgumentError, match="predicts 7 classes, the student 10"):
        teacher_for(student, str(tiny_model_dir), "deit_tiny_patch16_224", pretrained=False,
                    model_kwargs={**TINY_ARGS, "num_classes": 7})


def test_token_options_that_cannot_apply_are_refused(tmp_path, small_data):
    model_dir = converted_model_dir(tmp_path / "converted", tokens=4)
    for spec, kwargs, fragment in [
        (str(model_dir), {"num_semantic_tokens": 36}, "num_semantic_tokens=36 cannot apply to a saved model"),
        ("hf-hub:org/model", {"num_semantic_tokens": 16}, "num_semantic_tokens=16 cannot apply to a saved model"),
        (str(model_dir), {"semantic_tokens_per_window": 4}, "semantic_tokens_per_window=4 cannot apply"),
        ("swin_tiny", {"num_semantic_tokens": 36}, "Swin takes semantic_tokens_per_window"),
        ("stvit_r_swin_tiny_patch4_window7_224", {"num_semantic_tokens": 16}, "Swin takes semantic_tokens_per_window"),
        ("deit_tiny", {"semantic_tokens_per_window": 4}, "semantic_tokens_per_window is for Swin"),
    ]:
        with pytest.raises(InvalidArgumentError, match=fragment):
            load_model(spec, pretrained=spec.startswith(("/", "hf-hub:")), convert=True, **kwargs)
    out = tmp_path / "ft"
    for args in (["-m", str(model_dir), "--tokens", "36"], ["-m", "swin_tiny", "--no-pretrained", "--tokens", "36"]):
        r = cli_in_process(["finetune", *args, "-d", str(small_data), "-o", str(out), "--epochs", "1"])
        assert_one_line_error(r, "--tokens")
        assert not out.exists()


def test_finetuned_model_keeps_its_record_and_evaluation_and_resume_says_where(tmp_path, small_data):
    from stvit_core.model_card import read_eval_results

    model_dir = converted_model_dir(tmp_path / "converted", tokens=4)
    source_record = json.loads((model_dir / "config.json").read_text())["stvit"]
    out = tmp_path / "ft"
    args = ["finetune", "-m", str(model_dir), "-d", str(small_data), "-o", str(out), "--epochs", "2", "-b", "50",
            "--workers", "0", "--quiet"]
    r = cli_in_process(args)
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())  # the model that ran, not the options typed
    assert "tokens" not in config and config["num_semantic_tokens"] == 4
    assert config["architecture"] == "stvit_vit_patch16_224" and config["model_args"]["embed_dim"] == 48
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda row: row["top1"])
    record = json.loads((out / "best" / "config.json").read_text())["stvit"]
    assert {k: v for k, v in record.items() if k != "finetuned"} == source_record
    assert record["finetuned"] == {"top1": best["top1"], "top5": best["top5"], "epoch": best["epoch"],
                                   "dataset": str(small_data), "images": 100}
    results = json.loads((out / "best" / "results.json").read_text())
    assert results == {"dataset": str(small_data), "top1": best["top1"], "top5": best["top5"], "num_images": 100,
                       "split": "val"}
    card = read_eval_results(out / "best")  # what the model card shows
    assert (card["top1"], card["top5"], card["dataset"]) == (best["top1"], best["top5"], str(small_data))

    last = out / "checkpoints" / "last.pth"
    r = cli_in_process([*args, "--resume", str(last)])  # a finished run: nothing left to train
    assert r.returncode == 0, r.stderr
    assert f"resuming from {last} at epoch 3, step 12" in r.stderr.splitlines()[0]


def test_unwritable_output_is_one_line_and_leaves_nothing(tmp_path, small_data, tiny_model_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (unwritable_dir(tmp_path) / "ft", blocker / "ft"):
        r = cli_in_process(["finetune", "-m", str(tiny_model_dir), "-d", str(small_data), "-o", str(out),
                            "--epochs", "1", "-b", "50", "--workers", "0"])
        assert_one_line_error(r, "cannot create output directory", str(out))
        assert not out.exists()
    nested = tmp_path / "new" / "deeper" / "ft"  # a run that fails creates no parents either
    r = cli_in_process(["finetune", "-m", str(tiny_model_dir), "-d", str(small_data), "-o", str(nested),
                        "--epochs", "1", "-b", "500", "--workers", "0"])
    assert_one_line_error(r, "batch size 500")
    assert not (tmp_path / "new").exists()


def test_an_output_holding_only_a_config_counts_as_empty(tmp_path, small_data):
    from stvit_core.train_outputs import check_output_dir

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("epochs: 1\n")  # what a run killed before its first checkpoint leaves
    cfg = resolve_config(overrides=dict(data=str(small_data), output=str(out), epochs=1, batch_size=50, workers=0))
    train(cfg, tiny_stvit(tokens=4))
    assert (out / "best" / "model.safetensors").is_file()
    with pytest.raises(OutputExistsError, match="--resume"):  # now it holds a run
        check_output_dir(str(out), resume=False, force=False)


@pytest.mark.slow
def test_double_ctrl_c_in_epoch_one_then_the_same_command_just_works(tmp_path):
    data = make_subset(tmp_path / "data", 100, 2)  # an epoch of 1000 images takes far longer than 0.2 s
    out = tmp_path / "run"
    # one optimizer step per epoch (accumulation over every batch): the first Ctrl-C cannot be served before
    # the second arrives, which stops at once
    args = ["finetune", "-m", "stvit_deit_tiny_patch16_224", "--no-pretrained", "--tokens", "4", *MODEL_ARGS,
            "-d", str(data), "-o", str(out), "--epochs", "1", "-b", "10", "--accum-steps", "1000", "--workers", "0",
            "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "stvit_cli", *args], env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert not out.exists()
    rerun = cli_in_process(args)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "best" / "results.json").is_file()


@pytest.mark.slow
def test_training_and_evaluation_docs_run(tmp_path, monkeypatch):
    from tests.train_utils import run_doc_blocks

    monkeypatch.chdir(tmp_path)
    for page in ("training.md", "evaluation.md"):  # evaluation.md evaluates the model training.md trains
        run_doc_blocks(ROOT / "docs" / page)
    assert (tmp_path / "runs" / "fm-more" / "best" / "results.json").is_file()
    assert (tmp_path / "results.csv").is_file()
