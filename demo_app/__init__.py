"""The sessionscope demo application."""
