"""DAVSP workbook library: data, model adapters and the Deep Aligned Visual Safety Prompt.

The layout follows the method: ``data`` (records, loaders, splits, pools), ``models`` (the
adapter contract, its architectures, the embedded default, input building), ``method`` (the
harmfulness vector, the Visual Safety Prompt, training, intervention), ``evaluation``
(defended generation, judges, metrics, transfer, ECSO, the baseline defenses) and ``runtime``
(files, errors, sharding, the main job, the CLI). The names a user needs come from here::

    from davsp_lib import HarmfulnessVector, extract, fit_vector, load_adapter, train

Everything but the exceptions is imported on first use (PEP 562), so ``import davsp_lib``
stays as light as the exceptions module: torch and transformers load with the first model name.
"""

from __future__ import annotations

import importlib

from davsp_lib.runtime.errors import DataError, UnsupportedModelError

# typing.TYPE_CHECKING without importing typing (it would double the cost of the import)
TYPE_CHECKING = False
if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from typing import Any

    from davsp_lib.data.datasets import load_builtin
    from davsp_lib.evaluation.generation import Defense, generate_responses, make_defense
    from davsp_lib.evaluation.judges import RefusalJudge, make_judge
    from davsp_lib.method.intervention import ablate, steer
    from davsp_lib.method.training import TrainConfig, train
    from davsp_lib.method.vectors import HarmfulnessVector, extract, fit_vector
    from davsp_lib.method.vsp import VisualSafetyPrompt
    from davsp_lib.models.adapters import VLMAdapter, load_adapter
    from davsp_lib.models.conversation import Conversation

__version__ = "0.1.0"

#: public name -> the module that defines it (imported when the name is first read)
_LAZY: dict[str, str] = {
    "load_builtin": "davsp_lib.data.datasets",
    "VLMAdapter": "davsp_lib.models.adapters",
    "load_adapter": "davsp_lib.models.adapters",
    "Conversation": "davsp_lib.models.conversation",
    "HarmfulnessVector": "davsp_lib.method.vectors",
    "extract": "davsp_lib.method.vectors",
    "fit_vector": "davsp_lib.method.vectors",
    "VisualSafetyPrompt": "davsp_lib.method.vsp",
    "TrainConfig": "davsp_lib.method.training",
    "train": "davsp_lib.method.training",
    "steer": "davsp_lib.method.intervention",
    "ablate": "davsp_lib.method.intervention",
    "Defense": "davsp_lib.evaluation.generation",
    "make_defense": "davsp_lib.evaluation.generation",
    "generate_responses": "davsp_lib.evaluation.generation",
    "RefusalJudge": "davsp_lib.evaluation.judges",
    "make_judge": "davsp_lib.evaluation.judges",
}

__all__ = [
    "Conversation",
    "DataError",
    "Defense",
    "HarmfulnessVector",
    "RefusalJudge",
    "TrainConfig",
    "UnsupportedModelError",
    "VLMAdapter",
    "VisualSafetyPrompt",
    "__version__",
    "ablate",
    "extract",
    "fit_vector",
    "generate_responses",
    "load_adapter",
    "load_builtin",
    "make_defense",
    "make_judge",
    "steer",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'davsp_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later reads skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
