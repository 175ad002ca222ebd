"""The live view: MJPEG stream (encoded only while watched), the page at /, server-sent events."""
