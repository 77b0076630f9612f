"""``python -m lightning_dsd.compare LOG_DIR``: the command line of :mod:`lightning_dsd.tools.compare`."""

from lightning_dsd.tools.compare import main

if __name__ == "__main__":
    main()
