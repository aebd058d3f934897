"""LoRA on the LLM through peft, end to end: injection, the adapter saved in peft's format, its merge, its reuse.

* **Training.** :func:`inject_lora` adds peft LoRA layers to the LLM's ``target_modules`` in place (peft's
  ``LoraModel`` on ``model.language_model``): the model keeps its structure, forward and parameter names
  (``….q_proj.base_layer.weight``, ``….q_proj.lora_A.default.weight``), which the trainer's checkpoints hold.
* **Saving.** :func:`adapter_model` puts the trained weights into a fresh model wrapped by
  ``peft.get_peft_model`` with the same LoRA settings (:func:`lora_config`, the targets as a pattern over the whole
  model's module names) and, as ``modules_to_save``, every other part that training changed (projector, LAPE,
  ...). ``PeftModel.save_pretrained`` writes it to ``final/adapter`` (``adapter_config.json``,
  ``adapter_model.safetensors``) and ``merge_and_unload`` gives the plain model of ``final/``.
  ``PeftModel.from_pretrained(<the stage's init_from model>, "final/adapter")`` is then the same model.
* **Reuse.** ``model.adapter`` in a stage config starts the stage from ``model.init_from`` with an adapter merged
  in (:func:`apply_adapter`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from agrivlm.errors import ConfigError
from agrivlm.model.modeling import AgriVLMForConditionalGeneration
from agrivlm.train.checkpoint import CheckpointError
from agrivlm.train.config import LoraSettings

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

#: Prefix of LoRA parameter names (peft).
LORA_MARK = "lora_"
#: Subfolder of a final folder that holds the peft adapter of a LoRA stage.
ADAPTER_DIR = "adapter"
#: What a peft adapter folder holds (``PeftModel.save_pretrained``).
ADAPTER_CONFIG = "adapter_config.json"
#: The LLM's attribute in :class:`AgriVLMForConditionalGeneration` (LoRA targets only modules below it).
LLM = "language_model"


def lora_config(lora: LoraSettings, *, whole_model: bool, modules_to_save: Sequence[str] = ()) -> LoraConfig:
    """The peft ``LoraConfig`` of the ``lora:`` settings (every key: r, alpha, dropout, target_modules).

    Args:
        lora: the stage config's ``trainable.llm.lora``.
        whole_model: targets as a regular expression over the whole model's module names, restricted to the LLM
            (``language_model.<path>.(q_proj|…)``: what ``get_peft_model`` on the whole model needs); False: the
            plain names, for peft on ``model.language_model`` itself.
        modules_to_save: parts of the model saved whole in the adapter (trained beside the LoRA layers).
    """
    from peft import LoraConfig

    names = list(lora.target_modules)
    targets: str | list[str] = (
        rf"{LLM}\..*\.({'|'.join(re.escape(n) for n in names)})" if whole_model else names
    )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft types it int; floats work
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        modules_to_save=list(modules_to_save) or None,
    )


def inject_lora(model: AgriVLMForConditionalGeneration, lora: LoraSettings) -> float:
    """Add LoRA adapters to the LLM's ``target_modules`` in place (peft ``LoraModel``); returns ``alpha / r``.

    Raises:
        ConfigError: a target is not the name of a linear layer of the LLM (the message lists them).
    """
    from peft.tuners.lora import LoraModel

    names = {n.rsplit(".", 1)[-1] for n, m in model.language_model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(lora.target_modules) - names)
    if unknown:
        raise ConfigError(
            f"trainable.llm.lora.target_modules: {unknown} are not linear layers of the LLM; it has {sorted(names)}"
        )
    LoraModel(model.language_model, lora_config(lora, whole_model=False), "default")  # injects in place
    return lora.alpha / lora.r


def split_lora_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA-injected model's state dict → ``(base, lora)``.

    ``base``: the plain model's state, every ``….base_layer.…`` under the base layer's own name (``….q_proj.weight``)
    and no LoRA tensor; ``lora``: the LoRA tensors under their injected names (``….q_proj.lora_A.default.weight``).
    A state without LoRA gives ``(state, {})``.
    """
    base: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if LORA_MARK in key:
            lora[key] = value
        else:
            base[key.replace(".base_layer.", ".")] = value
    return base, lora


def adapter_model(
    plain: AgriVLMForConditionalGeneration,
    lora_state: dict[str, torch.Tensor],
    lora: LoraSettings,
    modules_to_save: Sequence[str],
    base_model: str,
) -> PeftModel:
    """The trained model as peft holds it: ``get_peft_model(plain, …)`` with the trained LoRA weights loaded.

    Args:
        plain: a model holding the trained weights without LoRA (:func:`split_lora_state`'s ``base``).
        lora_state: the trained LoRA tensors (:func:`split_lora_state`'s ``lora``).
        lora: the LoRA settings training used.
        modules_to_save: the other parts of the model that training changed (saved whole in the adapter).
        base_model: the model the adapter goes on (the stage's ``init_from``), written as the adapter config's
            ``base_model_name_or_path``.

    Returns:
        The ``PeftModel``: ``save_pretrained`` writes the adapter, ``merge_and_unload`` gives back ``plain`` with
        the LoRA updates merged (and the ``modules_to_save`` as trained).

    Raises:
        CheckpointError: the LoRA tensors do not fit the LoRA layers peft builds from ``lora`` (names the keys).
    """
    from peft import get_peft_model

    peft_model = get_peft_model(plain, lora_config(lora, whole_model=True, modules_to_save=modules_to_save))
    inner: Any = peft_model.base_model.model
    missing, unexpected = inner.load_state_dict(lora_state, strict=False)
    missing_lora = [k for k in missing if LORA_MARK in k]
    if missing_lora or unexpected:
        raise CheckpointError(
            f"the trained LoRA weights do not fit peft's LoRA layers: missing {missing_lora[:4]}, unexpected "
            f"{unexpected[:4]}; the lora settings changed since training?"
        )
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    return peft_model


def apply_adapter(
    model: AgriVLMForConditionalGeneration, folder: str | os.PathLike[str], base: str
) -> AgriVLMForConditionalGeneration:
    """``model`` with the peft adapter in ``folder`` merged in (``PeftModel.from_pretrained`` + ``merge_and_unload``).

    Args:
        model: the base model (the stage's ``model.init_from``, as the stage prepared it).
        folder: a folder written by ``PeftModel.save_pretrained`` (a LoRA stage's ``final/adapter``).
        base: where ``model`` came from, for the error messages.

    Raises:
        ConfigError: ``folder`` holds no adapter, or the adapter does not fit ``model`` (names both folders).
    """
    from peft import PeftModel

    path = Path(folder)
    if not (path / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            f"model.adapter: {path} has no {ADAPTER_CONFIG}; point it at a peft adapter folder (a LoRA stage's "
            f"final/{ADAPTER_DIR})"
        )
    try:
        peft_model: Any = PeftModel.from_pretrained(model, str(path))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"model.adapter: {path} does not fit the model of {base}: {_first_problem(exc)}") from exc
    merged: AgriVLMForConditionalGeneration = peft_model.merge_and_unload()
    return merged


def _first_problem(exc: BaseException) -> str:
    """A many-line load error (torch's) as one line: its first problem, and how many more there are."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[1]} (and {len(lines) - 2} more)"
