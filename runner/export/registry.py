"""The export formats by `export.format` name: one explicit table, no self-registration."""

from __future__ import annotations

from shardquant.config import QuantConfig
from shardquant.errors import UserError
from shardquant.export.awq import AWQExporter
from shardquant.export.base import Exporter, FakeExporter
from shardquant.export.compressed import CompressedTensorsExporter
from shardquant.export.gptq import GPTQExporter
from shardquant.model.source import ModelSource

EXPORTERS: dict[str, type[Exporter]] = {
    cls.format: cls for cls in (FakeExporter, CompressedTensorsExporter, GPTQExporter, AWQExporter)
}


def get_exporter(fmt: str, source: ModelSource, quant: QuantConfig) -> Exporter:
    """The exporter of `export.format`, checked against the scheme."""
    cls = EXPORTERS.get(fmt)
    if cls is None:
        raise UserError(f"export.format: '{fmt}' is not available (available: {', '.join(sorted(EXPORTERS))})")
    exporter = cls(source, quant)
    exporter.check()
    return exporter
