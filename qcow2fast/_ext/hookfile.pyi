from typing import Any, Final

from typing_extensions import disjoint_base

from .fileio import File

NO_FD: Final = 0x7FFFFFFF

@disjoint_base
class HookFile(File):
    @property
    def reader(self) -> Any: ...

def hook_file(reader: Any, writable: bool = False) -> HookFile: ...

@disjoint_base
class DebugFile(File):
    @property
    def rules(self) -> Any: ...
    def debug_event(self, name: str) -> None: ...

def debug_file(path: Any, rules: Any, writable: bool = False, direct: bool = False) -> DebugFile: ...
