"""The server's default bounds (no imports: the command line reads them without the serve extra)."""
DEFAULT_MAX_BATCH = 32  # rows per executable call
DEFAULT_MAX_WAIT_MS = 5.0  # how long a request waits for others to batch with
DEFAULT_MAX_QUEUE = 256  # requests waiting per model
DEFAULT_MAX_BODY = 64 << 20  # bytes of one request body (a batch of 64 224x224 images is 38 MB)
