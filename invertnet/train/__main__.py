"""``python -m invertnet.train MODEL DATASET``."""

from invertnet.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
