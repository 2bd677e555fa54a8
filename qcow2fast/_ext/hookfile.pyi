from typing import Any, Final

from .fileio import File

NO_FD: Final = 0x7FFFFFFF

class HookFile(File):
    @property
    def reader(self) -> Any: ...

def hook_file(reader: Any) -> HookFile: ...
