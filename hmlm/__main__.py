"""`python -m hmlm`, the same as the `hmlm` command (and what torchrun runs with `-m hmlm`)."""

from hmlm.cli import main

if __name__ == "__main__":
    main()
