"""Version numbers: fluency's own and the formats of what it writes.

A reader reads every earlier format version and refuses a newer, unknown one with one line
(see docs/architecture.md, "Formats and compatibility").
"""

__version__ = "0.1.0"

#: the Parquet activation store (``_COMPLETE.json``); 2 added the model description and store layers
STORE_FORMAT_VERSION = 2
#: the long metric table (rows carry plugin, plugin_version and options_hash since 2)
METRIC_TABLE_FORMAT_VERSION = 2
#: a run folder's manifest.json
MANIFEST_FORMAT_VERSION = 2
#: a run folder's marker (.fluency-run) and ledger (.fluency-ledger) of the files fluency wrote there
FOLDER_FORMAT_VERSION = 1
#: the plugin API (fluency.api, fluency.blocks): a plugin declaring another major version, or a newer minor
#: one, is listed as broken instead of failing at use time
PLUGIN_API_VERSION = "1.2"
