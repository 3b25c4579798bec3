// TLS toward the coordinator: gemmactl (--tls-ca) and workers (--coordinator-ca) verify its
// certificate against a CA file; without one they speak plaintext, to a coordinator started
// without --tls-cert.
#pragma once

#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/security/credentials.h"

namespace gemma {

// The whole of a PEM file; NOT_FOUND naming it when it cannot be read, INVALID_ARGUMENT when
// it holds no PEM block.
inline absl::StatusOr<std::string> ReadPemFile(const std::string& path, const char* what) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", what, " ", path));
  std::stringstream text;
  text << in.rdbuf();
  if (text.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, " is not a PEM file"));
  }
  return text.str();
}

// TLS credentials trusting the CAs of `ca_file`, or plaintext when it is empty.
inline absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> CoordinatorCredentials(
    const std::string& ca_file) {
  if (ca_file.empty()) return grpc::InsecureChannelCredentials();
  auto pem = ReadPemFile(ca_file, "the CA file");
  if (!pem.ok()) return pem.status();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = *pem;
  return grpc::SslCredentials(options);
}

}  // namespace gemma
