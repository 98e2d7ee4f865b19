#!/usr/bin/env python3
"""Judge JSON instances against one of the contract's JSON Schemas.

Reads from stdin `{"schema": "<path>", "cases": [<instance>, ...]}` and prints one line:
a JSON list of booleans, true where the instance is valid under the schema.

Validation is JSON Schema draft 2020-12 (jsonschema's Draft202012Validator) with format
checking. `date-time` is checked as RFC 3339 (a date, `T`, a time, an offset): by
jsonschema's own checker when its optional `rfc3339-validator` dependency is installed,
else by the equivalent check below, so the verdicts do not depend on optional packages.
A schema that is not itself valid is an error (exit 2), not a list of verdicts.

The schema's path is read relative to the working directory.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError

RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-](\d{2}):(\d{2}))$"
)


def is_rfc3339(instance: object) -> bool:
    if not isinstance(instance, str):
        return True  # formats judge only their own type
    m = RFC3339.match(instance)
    if not m:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if m.group(9) is not None and (int(m.group(9)) > 23 or int(m.group(10)) > 59):
        return False
    try:
        # A leap second (:60) is valid RFC 3339; check the rest of the date and time.
        datetime(year, month, day, hour, minute, min(second, 59))
    except ValueError:
        return False
    return second <= 60


def format_checker() -> FormatChecker:
    checker = FormatChecker()
    if "date-time" not in checker.checkers:
        checker.checks("date-time")(is_rfc3339)
    return checker


def main() -> int:
    request = json.load(sys.stdin)
    with open(request["schema"], encoding="utf-8") as f:
        schema = json.load(f)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        print(f"invalid schema {request['schema']}: {e.message}", file=sys.stderr)
        return 2
    validator = Draft202012Validator(schema, format_checker=format_checker())
    print(json.dumps([validator.is_valid(case) for case in request["cases"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
