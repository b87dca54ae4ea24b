"""Megatron-Energon integration: ddaug's sample type, the loader Energon calls for each sample,
and a cooker for datasets prepared as CrudeWebdataset.

`ddaug export --format energon` writes `.nv-meta/dataset.yaml` naming `DdaugChatSample` and
`.nv-meta/ddaug_sample_loader.py` (which imports the two functions below), so Energon's own
`get_train_dataset`, `energon info`, `energon lint` and `energon preview` read the export with
no user code. Every turn and every image arrive, in `<image>` order; text-only samples have
no images.

    from megatron.energon import WorkerConfig, get_loader, get_train_dataset
    ds = get_train_dataset("energon/", batch_size=8, shuffle_buffer_size=100, max_samples_per_sequence=100,
                           worker_config=WorkerConfig.default_worker_config())
    for batch in get_loader(ds): ...        # batch.messages, batch.images (lists per sample)

A dataset.yaml of `sample_type: CrudeWebdataset` (e.g. an older export, or a metadataset of
crude sets) cooks the same samples with `cookers = [ddaug_cooker]` on a TaskEncoder.
"""

from __future__ import annotations

from typing import Any

from megatron.energon import Cooker, Sample, basic_sample_keys, stateless
from megatron.energon.edataclass import edataclass

SAMPLE_LOADER_FILE = "ddaug_sample_loader.py"
# What the export's dataset.yaml says; `energon info` imports the class from this module.
DATASET_YAML = """\
sample_type:
  __module__: ddaug.shards.energon
  __class__: DdaugChatSample
sample_loader: {loader}:sample_loader
part_filter: {loader}:part_filter
"""
SAMPLE_LOADER_SOURCE = '''\
"""Written by `ddaug export --format energon`: Energon calls these for each sample."""
from ddaug.shards.energon import ddaug_part_filter as part_filter, load_ddaug_sample as sample_loader  # noqa: F401
'''


@edataclass
class DdaugChatSample(Sample):
    """One ddaug sample: the conversation, every image, the tags and the whole sample json."""

    #: [{"role", "content"}], every turn, "<image>" tags in place
    messages: list
    #: the images in "<image>" order (decoded by Energon: CHW float tensors by default); [] if text-only
    images: list
    #: {"domain", "task", "stage"}
    tags: dict
    #: the sample json as written (source, provenance block, extra)
    meta: dict


def ddaug_part_filter(part: str) -> bool:
    """Every member of a ddaug sample is needed: the json and all its images."""
    return True


def _fields(raw: dict[str, Any]) -> dict[str, Any]:
    meta = raw["json"]
    key = meta["key"]
    images = [raw[str(name)[len(key) + 1:]] for name in meta.get("images") or []]
    return {"messages": list(meta.get("messages") or []), "images": images,
            "tags": dict(meta.get("tags") or {}), "meta": meta}


def load_ddaug_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Energon's sample_loader: decoded members (json as a dict, images as tensors) -> the
    fields of DdaugChatSample. Images are taken in the order the json lists them."""
    return _fields(raw)


@stateless
def cook_ddaug(raw: dict[str, Any]) -> DdaugChatSample:
    """A CrudeWebdataset sample (a dict of decoded members) -> DdaugChatSample."""
    return DdaugChatSample(**basic_sample_keys(raw), **_fields(raw))


ddaug_cooker = Cooker(cook_ddaug)
