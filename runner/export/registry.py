"""The exporters by `export.format` name: one explicit table, no self-registration. Each
writes the layout of the same name in `formats.LAYOUTS`, the torch-free table that
`shardquant plan` and `shardquant inspect` look formats up in."""

from __future__ import annotations

from shardquant.config import QuantConfig
from shardquant.export.awq import AWQExporter
from shardquant.export.base import Exporter, FakeExporter
from shardquant.export.compressed import CompressedTensorsExporter
from shardquant.export.formats import get_layout
from shardquant.export.gptq import GPTQExporter
from shardquant.model.source import ModelSource

EXPORTERS: dict[str, type[Exporter]] = {
    cls.layout_class.name: cls for cls in (FakeExporter, CompressedTensorsExporter, GPTQExporter, AWQExporter)
}


def get_exporter(fmt: str, source: ModelSource, quant: QuantConfig) -> Exporter:
    """The exporter of `export.format`, checked against the scheme."""
    exporter = EXPORTERS[get_layout(fmt).name](source, quant)
    exporter.check()
    return exporter
