from typing import Any, Final

from typing_extensions import disjoint_base

from .fileio import File

NO_FD: Final = 0x7FFFFFFF

@disjoint_base
class HookFile(File):
    @property
    def reader(self) -> Any: ...

def hook_file(reader: Any) -> HookFile: ...
