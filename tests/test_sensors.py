import io

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from assets.partitions import SHARDS
from resources import ShardSourceResource
from sensors import new_shards_sensor
from tests.s3_server import moto_s3


def _shard_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"images": [[None, None]], "texts": [["A man rides a horse.", None]]}), buf)
    return buf.getvalue()


def test_new_shard_sensor_registers_s3_shards_once():
    with moto_s3(("corpus",)):
        import s3fs

        fs = s3fs.S3FileSystem(use_listings_cache=False)
        fs.pipe("corpus/in/part-00000.parquet", _shard_bytes())
        fs.pipe("corpus/in/sub/part-00001.jsonl", b'{"images": [null], "texts": ["hello there world"]}\n')
        fs.pipe("corpus/in/README.txt", b"not a shard")
        instance = dg.DagsterInstance.ephemeral()
        source = ShardSourceResource(input_uri="s3://corpus/in")

        result = new_shards_sensor(dg.build_sensor_context(instance=instance, resources={"shard_source": source}))
        keys = sorted(r.partition_key for r in result.run_requests)
        assert keys == ["part-00000", "sub__part-00001"]
        assert result.dynamic_partitions_requests[0].partition_keys == keys

        # once registered, the same listing requests nothing; a new shard is picked up alone
        instance.add_dynamic_partitions(SHARDS, keys)
        again = new_shards_sensor(dg.build_sensor_context(instance=instance, resources={"shard_source": source}))
        assert not again.run_requests and "no new shards among 2" in again.skip_reason.skip_message
        fs.pipe("corpus/in/part-00002.parquet", _shard_bytes())
        third = new_shards_sensor(dg.build_sensor_context(instance=instance, resources={"shard_source": source}))
        assert [r.partition_key for r in third.run_requests] == ["part-00002"]
