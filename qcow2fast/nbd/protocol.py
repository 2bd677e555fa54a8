"""The NBD wire format: constants and message layouts, named as in
NetworkBlockDevice/nbd ``doc/proto.md``.

Every message layout is one ``struct.Struct`` used both to build and to
parse it (the server packs replies, the tests' raw client packs requests).
All integers are big-endian (network byte order).
"""

import errno
import struct

# -- magic numbers -------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
NBD_OPT_REPLY_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server, 16 bits) and client flags (32 bits) -----------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# -- transmission flags (16 bits) ---------------------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# -- options ---------------------------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
# (The current proto.md numbers the meta-context options 9 and 10; an older
# draft had NBD_OPT_BLOCK_SIZE at 9.  libnbd and qemu use 9 and 10.)
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10

# -- option replies -------------------------------------------------------------------------
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9

# -- NBD_REP_INFO types ----------------------------------------------------------------------
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# -- commands and command flags -----------------------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured replies --------------------------------------------------------------------------
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- metadata contexts ----------------------------------------------------------------------------
BASE_ALLOCATION = "base:allocation"
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

# -- error values (the reply's error field) ----------------------------------------------------------
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Host errno -> the protocol's value (anything not listed is EIO).
ERRNO_TO_NBD = {errno.EPERM: NBD_EPERM, errno.EACCES: NBD_EPERM, errno.EROFS: NBD_EPERM,
                errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM, errno.EINVAL: NBD_EINVAL,
                errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC, errno.EFBIG: NBD_ENOSPC,
                errno.EOVERFLOW: NBD_EOVERFLOW, errno.ENOTSUP: NBD_ENOTSUP,
                errno.ESHUTDOWN: NBD_ESHUTDOWN}

# -- message layouts ---------------------------------------------------------------------------------
# S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags
SERVER_GREETING = struct.Struct(">QQH")
# C: 32-bit client flags
CLIENT_FLAGS = struct.Struct(">I")
# C: IHAVEOPT, option, length of option data
OPTION_HEADER = struct.Struct(">QII")
# S: reply magic, option, reply type, length of reply data
OPTION_REPLY = struct.Struct(">QIII")
# S (after NBD_OPT_EXPORT_NAME): export size, transmission flags (+124 zeroes)
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = bytes(124)
# NBD_REP_INFO payloads: type, then the fields of that type
INFO_EXPORT = struct.Struct(">HQH")           # size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")      # minimum, preferred, maximum payload
INFO_TYPE = struct.Struct(">H")               # followed by a string (NAME, DESCRIPTION)
# NBD_REP_META_CONTEXT payload: context id, then its name
META_CONTEXT_ID = struct.Struct(">I")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

# C: magic, command flags, type, handle (cookie), offset, length
REQUEST = struct.Struct(">IHHQQI")
# S: magic, error, handle
SIMPLE_REPLY = struct.Struct(">IIQ")
# S: magic, flags, type, handle, length of payload
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# NBD_REPLY_TYPE_OFFSET_DATA: chunk header, then the offset (data follows)
OFFSET_DATA_REPLY = struct.Struct(">IHHQIQ")
# NBD_REPLY_TYPE_OFFSET_HOLE: chunk header, then the offset and the hole's length
OFFSET_HOLE_REPLY = struct.Struct(">IHHQIQI")
# NBD_REPLY_TYPE_ERROR payload: error, message length (message follows)
ERROR_PAYLOAD = struct.Struct(">IH")
# NBD_REPLY_TYPE_BLOCK_STATUS: chunk header, context id, then descriptors of
# (length, status flags)
BLOCK_STATUS_REPLY = struct.Struct(">IHHQII")
BLOCK_DESCRIPTOR = struct.Struct(">II")

# Strings (export names, queries, messages) are at most this long.
MAX_STRING = 4096
