"""``python -m lightning_peft {fit,validate,test,predict} --config ...`` (see lightning_peft.lightning.cli)."""

from lightning_peft.lightning.cli import main

if __name__ == "__main__":
    main()
