"""Labelers used only by tests: real Labeler subclasses that fail on chosen samples."""

from dataclasses import dataclass

from modalmill.labelers.base import LabelFailure, Labeler, register_labeler


@register_labeler
class CaptionOrFail(Labeler):
    """Writes the key as a caption; fails (returns LabelFailure) or raises on the keys it is told to."""

    name = "test_caption_or_fail"
    outputs = ("caption",)

    @dataclass(frozen=True)
    class Config:
        fail_keys: tuple = ()
        raise_keys: tuple = ()

    def process_batch(self, batch):
        if any(inp.key in self.config.raise_keys for inp in batch):
            raise ValueError("boom on a chosen sample")
        return [LabelFailure(f"chosen to fail: {inp.key}") if inp.key in self.config.fail_keys
                else {"caption": [f"sample {inp.key}"]} for inp in batch]
