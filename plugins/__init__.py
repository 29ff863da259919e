"""loaderkit's built-in plugins, registered by name like any third-party plugin."""
