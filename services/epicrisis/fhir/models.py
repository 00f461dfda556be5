"""Which resource types FHIR R4 (the R4B models) defines: for validation and for messages."""

from __future__ import annotations

from functools import lru_cache

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.domainresource import DomainResource
from fhir.resources.R4B.resource import Resource
from pydantic import BaseModel

_ABSTRACT = (Resource, DomainResource)


@lru_cache(maxsize=1024)  # bounded: the names come from the input
def resource_model(resource_type: str) -> type[BaseModel] | None:
    """The R4B model of a concrete resource type; None for anything else (datatypes too)."""
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError):
        return None
    if not issubclass(model, Resource) or model in _ABSTRACT:
        return None
    return model


def printable_type(resource_type: str) -> str:
    """The type name if R4 defines it; input that merely looks like one is never repeated."""
    return resource_type if resource_model(resource_type) is not None else "<unknown resourceType>"
