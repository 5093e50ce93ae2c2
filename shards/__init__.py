"""Latent stores (zarr, webdataset, HDF5, or a plug-in's format) and views that join two stores on the item key.

The modules, one concern each: ``meta`` (meta.json), ``layout`` (file and write sizes), ``backend`` (the
format contract), ``formats`` (formats by name, through plug-ins), ``zarr_format`` / ``wds_format`` /
``h5_format`` (n2n's own formats), ``writer``, ``reader``, ``verify`` (verification and conversion),
``parts`` (stores written by several processes) and ``view``. Paths, URLs and atomic writes are
``n2n.files``, below every stage (re-exported here).
"""

from n2n.files import as_path, is_remote, remove_tree, write_json_atomic, write_text_atomic
from n2n.shards.backend import Backend
from n2n.shards.errors import FormatError, StoreError, StoreWriteError
from n2n.shards.formats import FORMATS, format_names
from n2n.shards.layout import Layout
from n2n.shards.meta import META_NAME, is_store
from n2n.shards.reader import Store, open_store
from n2n.shards.verify import convert_store, verify_store
from n2n.shards.view import Join, View, ViewError, create_view, open_view
from n2n.shards.writer import StoreWriter, create_store, resume_store

__all__ = [
    "FORMATS",
    "META_NAME",
    "Backend",
    "FormatError",
    "Join",
    "Layout",
    "Store",
    "StoreError",
    "StoreWriteError",
    "StoreWriter",
    "View",
    "ViewError",
    "as_path",
    "convert_store",
    "create_store",
    "create_view",
    "format_names",
    "is_remote",
    "is_store",
    "open_store",
    "open_view",
    "remove_tree",
    "resume_store",
    "verify_store",
    "write_json_atomic",
    "write_text_atomic",
]
