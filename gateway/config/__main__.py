"""``python -m gateway.config > config/schema.json``: the config's JSON Schema."""

import json

from gateway.config import config_json_schema

print(json.dumps(config_json_schema(), indent=2))
