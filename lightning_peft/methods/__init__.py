"""Built-in methods. Importing this package registers each one (one file per method).

Registration order is the order methods are listed in (README, CLI, errors); LoRA, the default,
comes first.
"""

# isort: off
from lightning_peft.methods import lora  # noqa: F401
from lightning_peft.methods import ia3  # noqa: F401
from lightning_peft.methods import bottleneck  # noqa: F401
from lightning_peft.methods import adalora  # noqa: F401
from lightning_peft.methods import bitfit  # noqa: F401
from lightning_peft.methods import last_k  # noqa: F401
from lightning_peft.methods import topk  # noqa: F401
from lightning_peft.methods import prompt_tuning  # noqa: F401
from lightning_peft.methods import p_tuning  # noqa: F401
from lightning_peft.methods import prefix_tuning  # noqa: F401

# isort: on
