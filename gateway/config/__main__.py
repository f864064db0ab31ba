"""``python -m gateway.config > config/schema.json``: the config's JSON Schema."""

import json

from gateway.config import config_json_schema

if __name__ == "__main__":
    print(json.dumps(config_json_schema(), indent=2))
