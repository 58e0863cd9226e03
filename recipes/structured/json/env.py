"""Structured output, JSON: extract a product listing into an object that must match a schema
and the gold fields.

Rewards (partial credit per field, so a weak model's groups are not tied):
  json_fields_match  1.0   share of the 5 gold fields the JSON gets right (checks.json_fields_match)
  json_schema        0.3   the JSON validates against SCHEMA (types, enum, no extra keys)
  json_only          0.1   the reply is just the JSON object (optionally in a ```json fence)
"""

from rlft import Environment, Reward
from rlft.rewards import checks

SCHEMA = {
    "type": "object",
    "required": ["product", "price", "currency", "quantity", "in_stock"],
    "additionalProperties": False,
    "properties": {
        "product": {"type": "string"},
        "price": {"type": "number"},
        "currency": {"enum": ["USD", "EUR", "GBP"]},
        "quantity": {"type": "integer"},
        "in_stock": {"type": "boolean"},
    },
}


def json_only(rollout) -> float:
    text = rollout.completion.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    return float(text.startswith("{") and text.endswith("}"))


SYSTEM = ('You extract data from text. Reply with one JSON object only, for example '
          '{"product": "desk lamp", "price": 12.5, "currency": "USD", "quantity": 3, "in_stock": true}')

env = Environment(
    system_prompt=SYSTEM,
    rewards=[checks.json_fields_match(), Reward(checks.json_schema(SCHEMA), weight=0.3), Reward(json_only, weight=0.1)],
    max_turns=1,
    max_tokens=80,
    name="structured-json",
)
