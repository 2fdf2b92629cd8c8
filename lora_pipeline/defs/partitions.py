"""One partition per style: styles come and go at run time, so the partitions are dynamic."""

import dagster as dg

STYLES_PARTITIONS_NAME = "styles"

styles_partitions = dg.DynamicPartitionsDefinition(name=STYLES_PARTITIONS_NAME)
