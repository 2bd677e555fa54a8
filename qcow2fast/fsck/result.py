"""What a check found (qemu's BdrvCheckResult) and what its repair will
write: the result fsck/check.py builds, fsck/repair.py carries out and the
check command prints."""


class ToolMessage(str):
    """A check message qemu-img prints with its name in front (an
    error_report, not the check's own fprintf)."""


class CheckResult:
    """qemu's BdrvCheckResult plus what a repair needs."""

    def __init__(self):
        self.corruptions = self.leaks = self.check_errors = 0
        self.corruptions_fixed = self.leaks_fixed = 0
        self.image_end_offset = 0
        self.total_clusters = self.allocated_clusters = 0
        self.fragmented_clusters = self.compressed_clusters = 0
        self.messages = []          # qemu's stderr lines, in qemu's order
        self.messages_dropped = 0   # lines past MAX_MESSAGES, counted only
        self.rebuild = False        # a refcount of 0 is referenced, or a refcount block is bad
        self.leaked = []            # (cluster, stored, expected)
        self.too_low = []           # (cluster, stored, expected)
        self.copied = 0             # wrong COPIED flags
        self.malformed = 0          # entries no refcount repair can fix
        self.flags = 0              # the header's dirty (1) and corrupt (2) bits
        self.refcount_fixes = []    # (cluster, new refcount) the repair writes
        self.entry_fixes = []       # (file offset, new L1/L2 entry) the repair writes
        self.snapshot_repairs = None  # engine.snapshot.TableRepairs: the table to write anew
        self.grow_to = 0            # the file size the repair grows the file to first (or 0)
        self.new_structures = None  # new_structures.StructurePlan: the rebuild's layout
        self.rebuild_refused = None  # why no rebuild may be made (a refcount too wide)
        self.failed = None          # why the check could not run to its end (qemu's errno)
