// The owner page is rendered on the server; reload it every 10 s to keep the figures fresh.
'use strict';
setTimeout(function () { window.location.reload(); }, 10000);
