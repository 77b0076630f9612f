"""``python -m lightning_dsd.demo``: the command line of :mod:`lightning_dsd.tools.demo`."""

from lightning_dsd.tools.demo import main

if __name__ == "__main__":
    main()
