from hub_fixtures import *  # noqa: F401,F403  (loopback Hub server, CLI helpers)
