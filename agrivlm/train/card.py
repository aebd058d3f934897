"""The model card (``README.md``) of a trained folder: a pure function of its saved HF configs.

Everything comes from ``config.json`` (its ``stage_info``: the stage, where its weights came from, the stage
config, the data and its manifests, steps, time, final metrics and, when a later evaluation added them, held-out
scores under ``heldout``) and ``processor_config.json`` (its ``inputs``): a re-saved folder gets the same card,
byte for byte (:func:`agrivlm.train.final.write_model_card`). Values the stage info lacks (a folder from an older
agrivlm, a snapshot saved mid-run) read "not recorded".
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

#: The card's file name in a final folder (what the Hub and ``huggingface_hub.ModelCard`` read).
MODEL_CARD = "README.md"
#: What each stage is for, in the card's words.
STAGE_PURPOSE = {
    "stage1": "vision–language alignment (LAPE off; projector and band adapter trained)",
    "stage2": "LAPE warm-up (position tokens switched on and trained)",
    "stage3": "agricultural fine-tune (field boundaries, growth stages)",
}
#: The card's YAML front matter (Hub metadata).
FRONT_MATTER = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- agrivlm
- lape
- remote-sensing
- agriculture
- satellite-image-time-series
---"""
NOT_RECORDED = "not recorded"


def model_card(config: dict[str, Any], processor_config: dict[str, Any]) -> str:
    """The card's Markdown text.

    Args:
        config: the folder's ``config.json`` (the model config, with ``stage_info``).
        processor_config: its ``processor_config.json`` (with ``inputs``), or ``{}``.
    """
    info: dict[str, Any] = config.get("stage_info") or {}
    stage_cfg: dict[str, Any] = info.get("config") or {}
    stage = str(info.get("stage", "unknown stage"))
    sections = [
        FRONT_MATTER,
        f"# agrivlm {stage} model",
        f"A LAPE vision-language model for multitemporal satellite image chips, the result of curriculum {stage}: "
        f"{STAGE_PURPOSE.get(stage, NOT_RECORDED)}, trained by `agrivlm train {stage}`. Its answers hold position "
        "tokens (`<WIDTH-012><HEIGHT-087>…`, dates as `<TEMP-…>`) that agrivlm turns into map coordinates and dates.",
        _base_section(info, stage_cfg),
        _data_section(info, stage_cfg),
        _training_section(info, stage_cfg),
        _metrics_section(info),
        _heldout_section(info),
        _inputs_section(processor_config.get("inputs") or {}, config),
        _usage_section(info, stage_cfg),
        _limits_section(info, stage, config, processor_config.get("inputs") or {}),
    ]
    return "\n\n".join(sections) + "\n"


def _base_section(info: dict[str, Any], stage_cfg: dict[str, Any]) -> str:
    model = stage_cfg.get("model") or {}
    source = info.get("init_source", NOT_RECORDED)
    pretrained = info.get("llm_pretrained")
    llm = ("the LLM's weights from the checkpoint its `llm.checkpoint` names" if pretrained is True else
           "the LLM from random weights (no `llm.checkpoint` in the model YAML)" if pretrained is False else "")
    if info.get("stage") == "stage1":
        overrides = model.get("overrides") or {}
        extra = f" with overrides `{json.dumps(overrides, sort_keys=True)}`" if overrides else ""
        if pretrained is False:
            lines = [f"- random init from the model YAML `{source}`{extra} (it names no `llm.checkpoint`)."]
        else:
            lines = [f"- built from the model YAML `{source}`{extra}" + (f", {llm}" if llm else "") + "."]
    elif "init_source" not in info:
        lines = [f"- {NOT_RECORDED}."]
    else:
        lines = [f"- starts from `{source}` (`model.init_from`: the previous stage's final folder)"
                 + (f", with {llm}" if llm else "") + "."]
    if info.get("init_adapter"):
        lines.append(f"- with the peft adapter `{info['init_adapter']}` merged into it (`model.adapter`).")
    digests = info.get("init_digests") or {}
    if digests:
        shown = ", ".join(f"{part} `{digest[:12]}`" for part, digest in sorted(digests.items()))
        lines.append(f"- SHA-256 of the starting weights, per part: {shown}.")
    return "## Base weights\n\n" + "\n".join(lines)


def _data_section(info: dict[str, Any], stage_cfg: dict[str, Any]) -> str:
    sources = info.get("data_sources")
    if not sources:
        roots = (stage_cfg.get("data") or {}).get("roots") or []
        lines = [f"- `{r}` (its manifest was not recorded)" for r in roots] or [f"- {NOT_RECORDED}"]
        return "## Training data\n\n" + "\n".join(lines)
    parts = ["## Training data", "Recipe outputs (`agrivlm recipe build`) and the records their `manifest.json` "
             "counts, by task and split:"]
    for src in sources:
        sha = str(src.get("recipe_sha256") or "")
        head = f"- `{src.get('root')}`: recipe `{src.get('recipe')}`"
        if src.get("recipe_file"):
            head += f" (`{src['recipe_file']}`" + (f", SHA-256 `{sha[:12]}`)" if sha else ")")
        stack = src.get("stack") or {}
        if stack:
            head += f"; {stack['sources']} stacks" if "sources" in stack else "; one stack"
            head += (f", {stack.get('n_dates', '?')} dates {str(stack.get('first_date', '?'))[:10]} → "
                     f"{str(stack.get('last_date', '?'))[:10]}")
        parts.append(head)
        parts.append(_task_table(src.get("records_by_task") or {}))
    parts.append(_selection(info, stage_cfg))
    return "\n\n".join(parts)


def _task_table(by_task: dict[str, dict[str, int]]) -> str:
    rows = ["| task | train | val | test |", "|---|---:|---:|---:|"]
    for task, counts in sorted(by_task.items()):
        rows.append(f"| {task} | " + " | ".join(str(counts.get(s, 0)) for s in ("train", "val", "test")) + " |")
    return "\n".join(rows)


def _selection(info: dict[str, Any], stage_cfg: dict[str, Any]) -> str:
    data = stage_cfg.get("data") or {}
    report = info.get("data") or {}
    kept = [f"families {', '.join(data['families'])}" if data.get("families") else "every family"]
    if data.get("text_only"):
        kept.append("records without positions only")
    if data.get("mixture"):
        weights = ", ".join(f"{name} {c.get('weight'):g}" for name, c in sorted(data["mixture"].items()))
        kept.append(f"re-mixed ({weights})")
    dropped = ", ".join(f"{k[len('dropped_'):]} {v}" for k, v in sorted(report.items()) if k.startswith("dropped_"))
    return (f"Used: {'; '.join(kept)}. Training records read {report.get('read', NOT_RECORDED)}, kept "
            f"{report.get('kept', NOT_RECORDED)} (left out: {dropped or 'none'}); validation records "
            f"{info.get('val_records', NOT_RECORDED)}.")


def _training_section(info: dict[str, Any], stage_cfg: dict[str, Any]) -> str:
    train = stage_cfg.get("train") or {}
    optim = stage_cfg.get("optim") or {}
    rows = [
        ("stage", f"{info.get('stage', NOT_RECORDED)}"),
        ("optimizer steps", f"{info.get('steps', NOT_RECORDED)} of {train.get('max_steps', NOT_RECORDED)}"),
        ("batch", f"{train.get('batch_size', '?')} per process × {train.get('grad_accum', '?')} accumulated × "
                  f"{info.get('num_processes', '?')} process(es)"),
        ("optimizer", f"AdamW, lr {optim.get('lr', '?')}, {optim.get('schedule', '?')} schedule, "
                      f"{optim.get('warmup_steps', '?')} warm-up steps, weight decay {optim.get('weight_decay', '?')}"),
        ("trained", _trained(stage_cfg)),
        ("trainable parameters", ", ".join(f"{k} {v:,}" for k, v in sorted((info.get("trainable_parameters")
                                                                            or {}).items())) or NOT_RECORDED),
        ("LAPE", _lape(info, stage_cfg)),
        ("frames per sample", _frames(stage_cfg)),
        ("mixed precision", str(info.get("mixed_precision", NOT_RECORDED))),
        ("seed", str(train.get("seed", NOT_RECORDED))),
        ("time", _time(info)),
    ]
    return "## Training\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _trained(stage_cfg: dict[str, Any]) -> str:
    t = stage_cfg.get("trainable") or {}
    llm = t.get("llm") or {}
    parts = [name for key, name in (("projector", "projector"), ("band_adapter", "band adapter"),
                                    ("vision", "vision encoder"), ("lape", "LAPE")) if t.get(key)]
    mode = llm.get("mode", NOT_RECORDED)
    if mode == "lora":
        lora = llm.get("lora") or {}
        parts.append(f"LLM through LoRA (r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
                     f"targets {', '.join(lora.get('target_modules') or [])}; adapter in `adapter/`)")
    elif mode == "full":
        parts.append("LLM (all its weights)")
    else:
        parts.append(f"LLM {mode}")
    return "; ".join(parts)


def _lape(info: dict[str, Any], stage_cfg: dict[str, Any]) -> str:
    if "lape" not in info:
        return NOT_RECORDED
    if not info["lape"]:
        return "off (position tokens are plain vocabulary)"
    lape = stage_cfg.get("lape") or {}
    return (f"on; loss weights spatial {lape.get('spatial_loss_weight', '?')}, temporal "
            f"{lape.get('temporal_loss_weight', '?')}; LR × {lape.get('lape_lr_multiplier', '?')} after "
            f"{lape.get('lape_warmup_steps', '?')} warm-up steps")


def _frames(stage_cfg: dict[str, Any]) -> str:
    frames = (stage_cfg.get("data") or {}).get("frames") or {}
    if frames.get("sampler") == "fast_slow":
        return f"fast/slow: {frames.get('num_fast')} fast + {frames.get('num_slow')} slow"
    return f"{frames.get('num_frames', NOT_RECORDED)} ({frames.get('sampler', '?')} sampler)"


def _time(info: dict[str, Any]) -> str:
    start, end = info.get("started_at"), info.get("finished_at")
    if not start:
        return NOT_RECORDED
    if not end:
        return f"started {start}; still running when this folder was saved (a snapshot)"
    seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    took = (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200
            else f"{seconds / 3600:.1f} h")
    return f"{start} → {end} ({took} wall clock from the first start, any pause before a resume included)"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics_section(info: dict[str, Any]) -> str:
    metrics = info.get("final_metrics")
    if not metrics:
        return f"## Final metrics\n\n{NOT_RECORDED} (a snapshot saved during training has none)."
    rows = "\n".join(f"| {k} | {_number(v)} |" for k, v in sorted(metrics.items()))
    return ("## Final metrics\n\nThe last logged optimizer step (`logs/metrics.jsonl`; `eval_*` on the validation "
            f"split):\n\n| metric | value |\n|---|---:|\n{rows}")


def _heldout_section(info: dict[str, Any]) -> str:
    scores = info.get("heldout")
    if not scores:
        return ("## Held-out scores\n\nNone recorded with this folder. Measure them on scenes it never saw "
                "(`agrivlm eval`, `benchmarks/learning.py`) before trusting its answers; a `heldout` dict in "
                "`config.json`'s `stage_info` appears here.")
    rows = "\n".join(f"| {k} | {_number(v)} |" for k, v in sorted(_flat(scores).items()))
    return f"## Held-out scores\n\n| set / metric | value |\n|---|---:|\n{rows}"


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name} / "))
        else:
            out[name] = value
    return out


def _inputs_section(inputs: dict[str, Any], config: dict[str, Any]) -> str:
    if not inputs:
        return f"## Inputs\n\n{NOT_RECORDED}: `agrivlm infer` uses its defaults."
    bands = inputs.get("bands") or {}
    frames = inputs.get("frames") or {}
    norm = ("per-chip percentiles " + str(bands.get("percentiles")) if bands.get("low") is None
            else f"fixed range low {bands.get('low')} high {bands.get('high')} (the training data's)")
    n_frames = (f"{frames.get('num_fast')} fast + {frames.get('num_slow')} slow"
                if frames.get("sampler") == "fast_slow" else f"up to {frames.get('max_frames')}")
    return "\n".join([
        "## Inputs", "",
        "As `agrivlm infer` prepares them (`processor_config.json` → `inputs`, also `agrivlm_inputs.yaml`):", "",
        f"- chips of {inputs.get('chip_size')} × {inputs.get('chip_size')} pixels, stride {inputs.get('stride')};",
        f"- {n_frames} dates per question (at least {inputs.get('min_frames')});",
        f"- band preset `{bands.get('preset')}`, normalised to [0, 1] by {norm};",
        f"- fields asked as `{inputs.get('fields_prompt')}`; position tokens: {config.get('num_spatial_tokens')} "
        f"per axis, {config.get('num_temporal_tokens')} for dates.",
    ])


def _usage_section(info: dict[str, Any], stage_cfg: dict[str, Any]) -> str:
    lines = [
        "## How to use", "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        "# agrivlm installed; or `import agrivlm` first and leave out trust_remote_code",
        'model = AutoModelForImageTextToText.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        'messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", '
        '"text": "Outline every field in this image."}]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        "# frames: (T, C, H, W) float32 chips; generation settings from generation_config.json (greedy, stops at the "
        "answer's end)",
        "# out = model.generate(**processor([prompt], images=[frames]))",
        "```", "",
        "On GeoTIFF stacks, with map outputs: `agrivlm infer STACK_DIR --model path/to/this/folder --out fields.gpkg`.",
    ]
    if ((stage_cfg.get("trainable") or {}).get("llm") or {}).get("mode") == "lora":
        lines += [
            "",
            "The LLM trained through LoRA: `adapter/` holds the peft adapter (LoRA layers and the other parts this "
            "stage trained), and the weights here are its merge (`merge_and_unload`). The same model, unmerged:",
            "",
            "```python",
            "from peft import PeftModel",
            "",
            f'base = AutoModelForImageTextToText.from_pretrained("{info.get("init_source")}", trust_remote_code=True)',
            *([f'base = PeftModel.from_pretrained(base, "{info["init_adapter"]}").merge_and_unload()  # model.adapter']
              if info.get("init_adapter") else []),
            'model = PeftModel.from_pretrained(base, "path/to/this/folder/adapter")',
            "```",
        ]
    return "\n".join(lines)


def _limits_section(info: dict[str, Any], stage: str, config: dict[str, Any], inputs: dict[str, Any]) -> str:
    families = ((info.get("config") or {}).get("data") or {}).get("families")
    tasks = sorted({t for src in info.get("data_sources") or [] for t in (src.get("records_by_task") or {})
                    if families is None or t.split("/", 1)[0] in families})
    bands = (inputs.get("bands") or {}).get("preset")
    lines = [
        "## Intended use and limits", "",
        "- Intended for research and prototyping: field outlines and crop growth stages (with dates) from time series "
        f"of satellite chips prepared as under Inputs (band preset `{bands}`), from regions, seasons and sensors like "
        "the training data's.",
        f"- Trained to answer these tasks only: {', '.join(tasks) if tasks else NOT_RECORDED}; other questions are "
        "outside its training.",
        "- Positions are quantised to the position-token grid (1/"
        f"{config.get('num_spatial_tokens')} of the chip per axis); small fields and boundaries closer than that blur.",
        "- Not validated for operational or financial decisions (subsidy control, insurance, yield): check the "
        "held-out scores above on data like yours first.",
    ]
    if info.get("llm_pretrained") is False:
        lines.append("- Its LLM started from random weights: it knows no language beyond the questions and answers "
                     "it was trained on.")
    if stage != "stage3":
        lines.append(f"- {stage} is an intermediate stage of the curriculum, the start of the next one; for "
                     "predictions use a stage 3 model.")
    return "\n".join(lines)
