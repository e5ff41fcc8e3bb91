"""``python -m stvit_cli`` (what ``torchrun -m stvit_cli finetune ...`` launches)."""

from .main import main

if __name__ == "__main__":
    main()
