"""Double of Forge's modules_forge package: its presence is how an extension tells Forge from A1111."""
