"""Plugin contracts and machinery: hook specs, specs, options, configuration, the plugin manager and the contracts of the five plugin kinds."""
