// A real OpenID provider (panva/oidc-provider), written by none of us, for budapp's OIDC
// integration test (crates/bud-app/tests/api/oidc.rs). Pinned to 8.x: 9.x supports Node.js 22
// and later only, and CI runs Node.js 20.
//
// Usage: node provider.mjs [PORT]   (or PORT in the environment; 0 or absent picks a free port)
//
// Listens on 127.0.0.1 only and prints `READY <issuer>` once it accepts connections. One
// confidential client, `bud-ci`, may use the client_credentials grant; asking for the resource
// `urn:bud` yields an RS256-signed JWT access token with `aud: "bud"`, `sub` = the client id
// and a top-level `roles` claim, which is how Auth0-style providers state roles.
//
// The signing key is generated at every start and lives only in memory: this provider is for
// tests and nothing else.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';

import Provider, { errors } from 'oidc-provider';

export const CLIENT_ID = 'bud-ci';
// Test-only; the Rust test uses the same value.
export const CLIENT_SECRET = 'bud-ci-secret-not-for-production';
export const RESOURCE = 'urn:bud';
export const AUDIENCE = 'bud';

const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`provider.mjs: bad port ${process.argv[2] ?? process.env.PORT}`);
  process.exit(2);
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'ci-rsa-1', use: 'sig', alg: 'RS256' };

const configuration = {
  clients: [
    {
      client_id: CLIENT_ID,
      client_secret: CLIENT_SECRET,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
    },
  ],
  jwks: { keys: [signingKey] },
  // Only the interaction flows, which no client here can start, use cookies.
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (_ctx, _client, oneOf) => oneOf ?? RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resourceIndicator) => {
        if (resourceIndicator !== RESOURCE) {
          throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
        }
        return {
          scope: 'bud',
          audience: AUDIENCE,
          accessTokenTTL: 5 * 60,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  extraTokenClaims: () => ({ roles: ['bud-developer'] }),
};

const server = createServer();
server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, configuration);
  provider.on('server_error', (_ctx, err) => console.error('provider.mjs: server error', err));
  server.on('request', provider.callback());
  console.log(`READY ${issuer}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
