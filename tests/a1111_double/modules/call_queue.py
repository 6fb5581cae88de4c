"""Double of modules/call_queue.py: the lock every webui generation holds (a FIFOLock there)."""

import threading

queue_lock = threading.Lock()
