"""archivecolor: exemplar-based colorization of archival grayscale scans."""

__version__ = "0.1.0"
