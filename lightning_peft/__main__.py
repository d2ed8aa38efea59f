"""``python -m lightning_peft {fit,validate,test,predict} --config ...`` (see :mod:`lightning_peft.cli`)."""

from lightning_peft.cli import main

if __name__ == "__main__":
    main()
