"""Checkpoint I/O in the Hugging Face folder layout, local or on any fsspec URL.

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` (what we write) or
``pytorch_model.bin`` (older public uploads; read with ``torch.load(weights_only=True)``, never unpickling
arbitrary objects). Paths may be local folders or fsspec URLs (``s3://bucket/prefix``, ``memory://...``);
S3 endpoint and credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).

Contract used by every model's ``from_pretrained`` / ``save_pretrained``:
    read_folder(path)  -> (config: dict, state_dict: dict[str, Tensor])
    write_folder(path, config, state_dict, extra_files={name: bytes})
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping

import fsspec
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_BIN_NAME = "pytorch_model.bin"
PREPROCESSING_NAME = "preprocessing.json"  # exported models: the recipe of the shards they were trained on (serving)


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def read_folder(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``config.json`` and the weights of a checkpoint folder at ``path`` (local or fsspec URL).

    ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` name a version of an MLflow registered model; its files
    are fetched from the tracking server in ``MLFLOW_TRACKING_URI`` (or the local default, see
    ``tvlt_core.tracking``) first. Raises FileNotFoundError naming the folder when it holds no config or no weights.
    """
    if path.startswith("models:/"):
        from tvlt_core.tracking import resolve_model_uri  # MLflow is imported only for registry URIs

        path = resolve_model_uri(path)
    fs, root = fsspec.core.url_to_fs(path)
    config_path = _join(root, CONFIG_NAME)
    if not fs.exists(config_path):
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; is this a Hugging Face checkpoint folder?")
    with fs.open(config_path, "r") as f:
        config = json.load(f)
    st_path, bin_path = _join(root, SAFETENSORS_NAME), _join(root, TORCH_BIN_NAME)
    if fs.exists(st_path):
        with fs.open(st_path, "rb") as f:
            state = safetensors_load(f.read())
    elif fs.exists(bin_path):
        with fs.open(bin_path, "rb") as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: neither {SAFETENSORS_NAME} nor {TORCH_BIN_NAME} found")
    return config, state


def write_folder(
    path: str,
    config: Mapping,
    state_dict: Mapping[str, torch.Tensor],
    extra_files: Mapping[str, bytes] | None = None,
) -> None:
    """Write a checkpoint folder that ``transformers``' ``from_pretrained`` also reads.

    Tensors are made contiguous and de-aliased (safetensors refuses shared storage, e.g. tied weights).
    ``extra_files`` (tokenizer vocab, model card, ...) are written beside the weights.
    """
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with fs.open(_join(root, SAFETENSORS_NAME), "wb") as f:
        f.write(safetensors_save(tensors, metadata={"format": "pt"}))
    with fs.open(_join(root, CONFIG_NAME), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    for name, data in (extra_files or {}).items():
        with fs.open(_join(root, name), "wb") as f:
            f.write(data)
    log.info("wrote checkpoint %s (%d tensors)", path, len(tensors))


def load_matching(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load ``state_dict`` by parameter name; with ``strict`` a missing or unexpected key raises, naming them."""
    result = module.load_state_dict(dict(state_dict), strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise KeyError(
            f"{type(module).__name__}: checkpoint does not match the model; "
            f"missing={result.missing_keys[:10]} unexpected={result.unexpected_keys[:10]}"
        )
    if result.missing_keys or result.unexpected_keys:
        log.warning("non-strict load: missing=%s unexpected=%s", result.missing_keys, result.unexpected_keys)
