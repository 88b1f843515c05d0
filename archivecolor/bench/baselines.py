"""What the exemplar method is compared with, besides gray."""

from __future__ import annotations

from archivecolor.color import global_transfer

__all__ = ["global_transfer"]
