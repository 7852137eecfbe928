"""The checkpoint file format: byte layout and commit record (``layout``), typed
pickle-free values (``codec``), and DCP metadata as JSON (``dcp_metadata``). Pure: no
module here does I/O."""
