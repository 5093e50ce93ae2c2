"""Latent stores (zarr, webdataset, HDF5) and views that join two stores on the item key."""

from n2n.shards.store import (
    FORMATS,
    Store,
    StoreError,
    StoreWriter,
    convert_store,
    create_store,
    open_store,
    resume_store,
    verify_store,
)
from n2n.shards.view import Join, View, ViewError, create_view, open_view

__all__ = [
    "FORMATS",
    "Join",
    "Store",
    "StoreError",
    "StoreWriter",
    "View",
    "ViewError",
    "convert_store",
    "create_store",
    "create_view",
    "open_store",
    "open_view",
    "resume_store",
    "verify_store",
]
