"""A model argument as vLLM takes it: a local checkpoint directory, or a Hugging Face Hub id
("org/name") that becomes a directory of the hub's cache, downloaded there if need be.

huggingface_hub itself reads HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN; nothing here
passes a cache, token or offline flag of its own (only `download_dir`, when the user gives one),
so the environment decides as it does for transformers and vLLM. Only the files the engine
reads are fetched: a repository often holds the same weights again as PyTorch .bin, GGUF,
ONNX or `original/` files, many gigabytes that would never be opened.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from paged_jax.engine_args import EngineArgs

# What tokenizer.py and server/chat_template.py read (the config holds the EOS ids when
# generation_config.json does not), and what transformers needs to load the same directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "config.json")
# What model/loader.py reads: one safetensors file, or the index and the shards it names.
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors", *TOKENIZER_FILES)


def resolve(args: EngineArgs) -> EngineArgs:
    """args with `model` and `tokenizer` as local directories. Done once, where an engine is
    made, so that everything after (each data-parallel engine, the loader, the tokenizer, the
    chat template) reads files. The tokenizer's revision defaults to the model's, as in vLLM."""
    model = local_dir(args.model, args.revision, args.download_dir)
    tokenizer = args.tokenizer and local_dir(args.tokenizer, args.tokenizer_revision or args.revision,
                                             args.download_dir, TOKENIZER_FILES)
    speculative = args.speculative_config
    if isinstance(speculative, dict) and isinstance(speculative.get("model"), str):  # a draft model (main revision)
        speculative = {**speculative, "model": local_dir(speculative["model"], None, args.download_dir)}
    return dataclasses.replace(args, model=model, tokenizer=tokenizer, speculative_config=speculative)


def local_dir(model: str, revision: str | None = None, download_dir: str | None = None,
              files: tuple[str, ...] = MODEL_FILES) -> str:
    """`model` itself if it is a directory; else the snapshot of hub id `model` at `revision`
    (a branch, tag or commit; default main) in `download_dir`, or the hub's cache."""
    if Path(model).is_dir():
        return model
    named = f"{model!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return snapshot_download(model, revision=revision, cache_dir=download_dir, allow_patterns=list(files))
    except HFValidationError as error:
        raise ValueError(f"{model!r} is neither a local directory nor a Hugging Face Hub id (org/name)") from error
    except GatedRepoError as error:  # before RepositoryNotFoundError, which it extends
        raise ValueError(f"{named} is gated on the Hugging Face Hub: ask for access at https://huggingface.co/"
                         f"{model}, then log in (`hf auth login`, or set HF_TOKEN) as a user who has it") from error
    except RepositoryNotFoundError as error:
        raise ValueError(f"{named} is neither a local directory nor a model on the Hugging Face Hub that this "
                         "user may read: check the path or id; for a private model, log in (`hf auth login`, or "
                         "set HF_TOKEN)") from error
    except RevisionNotFoundError as error:
        raise ValueError(f"{model!r} has no revision {revision!r} on the Hugging Face Hub: give a branch, tag or "
                         "commit hash that it has") from error
    except LocalEntryNotFoundError as error:
        cache = download_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(f"{named} is neither a local directory nor (whole) in the Hugging Face cache at "
                                f"{cache}, and the Hub cannot be reached (HF_HUB_OFFLINE=1, or no connection): "
                                f"download it once online (`hf download {model}`), or unset HF_HUB_OFFLINE") from error
