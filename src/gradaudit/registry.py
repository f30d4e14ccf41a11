"""One small registry per component family: a name maps to a factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from gradaudit.errors import ConfigError, UnknownComponentError

T = TypeVar("T")


class NoParams(BaseModel):
    """The parameters of a component that takes none."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component: its factory, its params spec and a summary for `gradaudit list`."""

    name: str
    factory: T
    summary: str
    params: type[BaseModel]


class Registry(Generic[T]):
    """Maps snake_case names to factories of one family (datasets, models, attacks, ...).

    Args:
        family: the family's name, used in error messages ("model", "attack", ...).

    Example:
        >>> reg: Registry[Callable[[], int]] = Registry("number")
        >>> @reg.register("one", summary="the number one")
        ... def one() -> int:
        ...     return 1
        >>> reg.get("one")()
        1
        >>> reg.get("two")
        Traceback (most recent call last):
        ...
        gradaudit.errors.UnknownComponentError: unknown number 'two'; known: one
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        *,
        summary: str,
        params: type[BaseModel] = NoParams,
        force: bool = False,
    ) -> Callable[[T], T]:
        """Decorator that registers `factory` under `name`; refuses to overwrite unless `force`.

        Args:
            name: the snake_case key users write in a scenario.
            summary: one line for `gradaudit list`.
            params: the pydantic model (frozen, extra="forbid") that validates the component's
                ``params`` mapping.
            force: replace an existing entry of the same name.
        """

        def decorator(factory: T) -> T:
            if name in self._entries and not force:
                raise ValueError(f"{self.family} {name!r} is already registered")
            self._entries[name] = Entry(name, factory, summary, params)
            return factory

        return decorator

    def entry(self, name: str) -> Entry[T]:
        """The entry registered as `name`; an unknown name lists the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownComponentError(f"unknown {self.family} {name!r}; known: {known}") from None

    def get(self, name: str) -> T:
        """The factory registered as `name`."""
        return self.entry(name).factory

    def parse_params(
        self, name: str, params: dict[str, object], *, where: str = "", source: str = ""
    ) -> BaseModel:
        """Validate `params` for component `name`; errors name the path `where` in `source`."""
        from gradaudit.config import format_validation_error

        spec = self.entry(name).params
        try:
            return spec.model_validate(params)
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, spec, prefix=where, source=source)
            ) from None

    def entries(self) -> list[Entry[T]]:
        """All entries, sorted by name."""
        return [self._entries[k] for k in sorted(self._entries)]

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
