"""Input readers: one plug-in per corpus layout (``input_reader`` kind), all yielding ``Document``s.

``obelics`` (``realsyn.readers.obelics:ObelicsReader``) and ``mmc4``
(``realsyn.readers.mmc4:Mmc4Reader``) are registered in ``realsyn.plugins``; pick one in config
as ``{name, params}`` and build it with ``build_plugin("input_reader", ...)``.
"""

from realsyn.readers.document import Document, NoShardsError, ShardSchemaError, image_id, list_input_shards, sentence_id, shard_key

__all__ = ["Document", "NoShardsError", "ShardSchemaError", "image_id", "list_input_shards", "sentence_id", "shard_key"]
