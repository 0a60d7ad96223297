"""JSON Schemas of the requests the relay sends to the GetMyInvoices API (v3).

Written from the published v3 description (a copy: Minicon-eG/Minicon.GetMyInvoices.Client,
Minicon.GetMyInvoices.Client/api.json), which is not valid OpenAPI: its document types are
listed in prose, `exists` is a `oneOf` of `fileHash` and `fileContent`. Only the fields
the relay uses are allowed: anything else is a mistake of ours.
"""

from __future__ import annotations

from typing import Any, Final

from worker.models import GMI_DOCUMENT_TYPES

BASE64: Final = "^[A-Za-z0-9+/]*={0,2}$"

UPLOAD: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["fileName", "fileContent", "documentType"],
    "additionalProperties": False,
    "properties": {
        "fileName": {"type": "string", "minLength": 1, "pattern": r"\.(pdf|PDF)$"},
        "fileContent": {"type": "string", "minLength": 4, "pattern": BASE64},
        "documentType": {"enum": list(GMI_DOCUMENT_TYPES)},
        "documentNumber": {"type": "string", "minLength": 1},
        "note": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "runOCR": {"type": "boolean"},
    },
}

EXISTS: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["fileContent"],
    "additionalProperties": False,
    "properties": {"fileContent": {"type": "string", "minLength": 4, "pattern": BASE64}},
}

# Headers every request carries (names compared case-insensitively).
REQUIRED_HEADERS: Final = ("x-api-key", "x-application")
