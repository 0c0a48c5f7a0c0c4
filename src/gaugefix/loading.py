"""A checkpoint through transformers' own loading, every refusal in one line (shared by
:mod:`gaugefix.model` and the quantised formats' models, which it must not import)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GaugefixError

if TYPE_CHECKING:
    import torch


def load_causal_lm(path: Path, dtype: torch.dtype, **options: Any) -> torch.nn.Module:
    """A checkpoint through transformers' own loading (``options`` go to from_pretrained,
    e.g. a device map), with every way it can refuse a bad checkpoint in one line."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    # transformers' fused-expert kernel (grouped_mm) has no float64; the eager loop does
    extra = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    extra.update(options)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                           output_loading_info=True, **extra)
    except pickle.UnpicklingError:
        raise GaugefixError(f"{path}: refused: its weights need code to unpickle, and gaugefix "
                            "only reads torch files with weights_only=True") from None
    except SafetensorError as exc:
        raise GaugefixError(f"{path}: not a valid weight shard ({exc})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # config or files unusable
        first = str(exc).strip().split("\n", 1)[0]
        raise GaugefixError(f"{path}: transformers could not load the model ({first})") from None
    except RuntimeError as exc:
        if "mismatch" not in str(exc):
            raise  # a bug or out of memory, not a bad checkpoint: let it show
        raise GaugefixError(f"{path}: tensor shapes do not fit its config.json") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would fill them at random: not the checkpoint's function
        from .arch import collapse_layers

        names = list(dict.fromkeys(collapse_layers(k) for k in missing))
        raise GaugefixError(f"{path}: its config.json needs {len(missing)} tensors the weight "
                            f"files lack ({', '.join(names[:6])}"
                            f"{' ...' if len(names) > 6 else ''}); transformers would "
                            "initialise them at random")
    return model.eval()
