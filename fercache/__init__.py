"""fercache: facial-expression recognition in video on a cached frozen-backbone feature store."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fercache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
