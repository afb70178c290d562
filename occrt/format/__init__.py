"""The `.occ` container: constants, reader and writer (format_spec/occ.md is the normative description)."""
from occrt.format.reader import OccFile, SectionEntry, TensorEntry
from occrt.format.writer import OccWriter, canonical_json

__all__ = ["OccFile", "OccWriter", "SectionEntry", "TensorEntry", "canonical_json"]
