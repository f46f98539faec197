# A stand-in network: one null_resource and its outputs. The null provider comes from a
# local provider mirror (XOOGIFY_TF_PLUGIN_MIRROR), so this runs offline on Terraform 1.0+.
# The state backend (the gateway's HTTP backend) is configured by the runner.

terraform {
  required_version = ">= 1.0.0"
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = ">= 2.1.0"
    }
  }
}

variable "name" {
  type    = string
  default = "demo"
}

variable "cidr" {
  type    = string
  default = "10.0.0.0/16"
}

resource "null_resource" "network" {
  triggers = {
    name = var.name
    cidr = var.cidr
  }

  provisioner "local-exec" {
    command = "echo creating network ${var.name} with ${var.cidr}"
  }

  provisioner "local-exec" {
    when    = destroy
    command = "echo destroying network ${self.triggers.name}"
  }
}

output "network_id" {
  value = null_resource.network.id
}

output "cidr" {
  value = var.cidr
}
